"""The tokenizer's training text: a seeded sample spread over many files, reading only what it uses.

Files are taken in an order fixed by a seeded hash of their keys, at most `per_file` characters from each (the
readers stream, so the rest of a big file is never read), until the budget is met. The same files and seed give the
same lines, so the same tokenizer.
"""

from __future__ import annotations

from dataprep.sources import Document, Part, read_documents
from dataprep.worker import split_hash
from raylm.errors import DataError
from raylm.storage import FileEntry
from raylm.tokenizer import train_tokenizer

MAX_LINE_BYTES = 16384
"""Longer lines are left out of the sample (SentencePiece's max_sentence_length)."""


def choose_files(files: list[FileEntry], *, seed: int, budget: int, per_file: int) -> list[Part]:
    """The files the sample reads, in sample order: enough that min(size, per_file) over them covers the budget."""
    chosen, size = [], 0
    for f in sorted(files, key=lambda f: split_hash(seed, "tokenizer-sample", f.key)):
        if size >= budget:
            break
        chosen.append(Part(f.path, f.size, f.key))
        size += min(f.size, per_file)
    return chosen


def sample_lines(parts: list[Part], *, text_field: str, budget: int, per_file: int) -> list[str]:
    lines, total = [], 0
    for part in parts:
        taken = 0
        documents = read_documents(part, text_field=text_field, encoding_errors="replace")
        for record in documents:
            if not isinstance(record, Document):
                continue
            take = record.text[:per_file - taken]
            taken += len(take)
            lines.extend(line for line in take.split("\n") if line and len(line.encode()) <= MAX_LINE_BYTES)
            if taken >= per_file:
                break
        documents.close()  # stops reading the file
        total += taken
        if total >= budget:
            break
    return lines


def sample_plan(files: list[FileEntry], *, seed: int, sample_mb: float, sample_file_mb: float) -> dict:
    """What the sample reads (decided on the driver, so only the chosen files travel to the task)."""
    budget = int(sample_mb * 2**20)
    per_file = max(int(sample_file_mb * 2**20), budget // max(len(files), 1))
    return {"parts": choose_files(files, seed=seed, budget=budget, per_file=per_file), "budget": budget,
            "per_file": per_file}


def sample_and_train(plan: dict, *, text_field: str, vocab_size: int) -> tuple[bytes, int]:
    """(tokenizer model, lines it was trained on): runs as one Ray task, on a worker node of a cluster."""
    lines = sample_lines(plan["parts"], text_field=text_field, budget=plan["budget"], per_file=plan["per_file"])
    if not lines:
        raise DataError("the corpus has no text to train a tokenizer on; check --input and --text-field")
    return train_tokenizer(lines, vocab_size=vocab_size), len(lines)
