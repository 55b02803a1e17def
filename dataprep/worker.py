"""What a Ray worker does with one work unit: read, tokenize, pack and write its shards, then commit it.

The driver gets back only the unit's stats (rows, tokens, documents, shard bytes and sha256, dropped tail, bad
records, the node it ran on): what it receives grows with the number of units, never with the number of tokens.
A unit is committed by its record in `_progress/` (written after its shards); a re-run reuses exactly the units
whose record matches, so a killed dataprep redoes only the rest.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import resource
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from dataprep import chat
from dataprep.shards import ExamplePacker, SplitPacker
from dataprep.sources import BadRecord, Document, read_documents, read_records
from dataprep.tokenizer import load_tokenizer, token_dtype
from dataprep.output import SPLITS, progress_path
from dataprep.units import Unit
from raylm import storage

ENCODE_CHARS = 1 << 20
"""Text encoded per SentencePiece call: amortises the call, bounds the Python lists it returns."""


def split_hash(*parts: object) -> float:
    """A stable hash of `parts` in [0, 1): the same on every machine, process and Python version."""
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True)
class UnitJob:
    """Everything a worker needs besides the unit itself (shipped once per actor)."""

    output: str
    tokenizer: dict[str, bytes]
    """The tokenizer's files themselves, not a path: a worker node may not see a local output directory."""
    run_stamp: str
    seq_len: int
    rows_per_shard: int
    val_fraction: float
    seed: int
    text_field: str
    encoding_errors: str
    on_bad_record: str
    format: str = "text"
    """'text': documents packed end to end; 'chat': conversations packed whole with a loss mask."""
    overlong: str = "truncate"
    """Chat: what happens to an example longer than a row."""


def abort(packers: dict) -> None:
    for packer in packers.values():
        packer.abort()


class PackUnits:
    """Ray Data actor: one unit per call (the tokenizer is loaded once per actor)."""

    def __init__(self, job: UnitJob):
        import ray

        self.job = job
        self.tokenizer = load_tokenizer(job.tokenizer)
        self.dtype = token_dtype(self.tokenizer.vocab_size)
        self.node = ray.get_runtime_context().get_node_id()
        self.ready_at = time.time()

    def __call__(self, batch: pa.Table) -> pa.Table:
        stats = [json.dumps(self.pack(Unit.from_json(u))) for u in batch.column("unit").to_pylist()]
        return pa.table({"stats": stats})

    def pack(self, unit: Unit) -> dict:
        """The unit's stats; its shards and commit record are written, unless it met a bad record it must stop at."""
        started, cpu = time.time(), time.process_time()
        packers = {s: self._packer(f"{s}/{unit.name}") for s in SPLITS}
        counts = {"bad_records": 0, "replaced_utf8_documents": 0}
        pack = self._pack_conversations if self.job.format == "chat" else self._pack_documents
        try:
            error = pack(unit, packers, counts)
        except BaseException:
            abort(packers)
            raise
        if error:
            abort(packers)
            return {"unit": unit.index, "error": error}
        stats = {"unit": unit.index, "input_bytes": unit.input_bytes, **counts,
                 "splits": {s: p.finish() for s, p in packers.items()}}
        storage.write_bytes(progress_path(self.job.output, unit),
                            json.dumps({"stamp": unit.stamp(self.job.run_stamp), "stats": stats}).encode())
        return {**stats, "node": self.node, "ready_at": self.ready_at, "seconds": time.time() - started,
                "cpu_s": time.process_time() - cpu, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    def _packer(self, stem: str):
        if self.job.format == "chat":
            return ExamplePacker(self.job.output, stem, self.job.seq_len + 1, self.job.rows_per_shard, self.dtype,
                                 pad_id=self.tokenizer.eos_id, overlong=self.job.overlong)
        return SplitPacker(self.job.output, stem, self.job.seq_len + 1, self.job.rows_per_shard, self.dtype)

    def _pack_conversations(self, unit: Unit, packers: dict, counts: dict) -> str | None:
        """Each conversation of the unit, tokenized with its loss mask, to its split's packer; the first bad
        record's one-line description if the run stops at bad records."""
        for part in unit.parts:
            for record in read_records(part, encoding_errors=self.job.encoding_errors):
                example = record if isinstance(record, BadRecord) else chat.tokenize(self.tokenizer, record)
                if isinstance(example, BadRecord):
                    if self.job.on_bad_record == "error":
                        return f"{example.where}: {example.reason}"
                    counts["bad_records"] += 1
                    continue
                counts["replaced_utf8_documents"] += record.replaced_utf8
                packers[self._split(example)].add(example.tokens, example.loss)
        return None

    def _pack_documents(self, unit: Unit, packers: dict, counts: dict) -> str | None:
        """Feed every document of the unit to the split packers, ENCODE_CHARS at a time; the first bad record's
        one-line description if the run stops at bad records."""
        read = {"text_field": self.job.text_field, "encoding_errors": self.job.encoding_errors}
        pending: list[Document] = []
        chars, replaced = 0, False
        for part in unit.parts:
            for record in read_documents(part, **read):
                if isinstance(record, BadRecord):
                    if self.job.on_bad_record == "error":
                        return f"{record.where}: {record.reason}"
                    counts["bad_records"] += 1
                    continue
                replaced |= record.replaced_utf8
                if record.ends:
                    counts["replaced_utf8_documents"] += replaced
                    replaced = False
                pending.append(record)
                chars += len(record.text)
                if chars >= ENCODE_CHARS:
                    self._encode(pending, packers)
                    pending, chars = [], 0
        self._encode(pending, packers)
        return None

    def _encode(self, docs: list[Document], packers: dict) -> None:
        """Tokens of `docs` to their split's packer, in order; EOS closes each document."""
        ids = self.tokenizer.encode([d.text for d in docs], num_threads=1)  # one core per actor
        streams: dict[str, list[list[int]]] = {s: [] for s in SPLITS}
        documents = dict.fromkeys(SPLITS, 0)
        for doc, tokens in zip(docs, ids):
            split = self._split(doc)
            if doc.ends:
                tokens.append(self.tokenizer.eos_id)
                documents[split] += 1
            streams[split].append(tokens)
        for split, lists in streams.items():
            if lists:
                flat = np.fromiter(itertools.chain.from_iterable(lists), self.dtype, count=sum(map(len, lists)))
                packers[split].add(flat, documents[split])

    def _split(self, doc: Document | chat.Example) -> str:
        val = self.job.val_fraction > 0 and split_hash(self.job.seed, "split", doc.key) < self.job.val_fraction
        return "val" if val else "train"
