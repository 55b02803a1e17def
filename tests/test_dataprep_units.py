"""Work units and streaming readers, without Ray: units fixed by the input, big files cut without losing or
repeating a document, memory that does not grow with file size, a tokenizer sample that reads only what it uses."""

from __future__ import annotations

import gzip
import json
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq

from dataprep.sample import sample_lines, sample_plan
from dataprep.sources import CHUNK_CHARS, Document, Part, read_documents
from dataprep.units import plan_units
from raylm.storage import list_files

READ = {"text_field": "text", "encoding_errors": "strict"}


def documents(parts: list[Part]) -> list[tuple[str, str]]:
    return [(d.key, d.text) for p in parts for d in read_documents(p, **READ) if isinstance(d, Document)]


def test_units_are_consecutive_files_up_to_the_size_and_cut_big_files(tmp_path):
    for name, size in (("a.txt", 300), ("b.txt", 300), ("c.txt", 300), ("d.txt", 900)):
        (tmp_path / name).write_text("x" * size)
    lines = "".join(json.dumps({"text": f"line {i} " + "y" * (i % 50)}) + "\n" for i in range(400))
    (tmp_path / "e.jsonl").write_text(lines)
    (tmp_path / "f.txt").write_text("z" * 100)
    units = plan_units(list_files(str(tmp_path)), unit_bytes=700)
    names = [[p.path.rsplit("/", 1)[1] for p in u.parts] for u in units]
    big = len(lines.encode()) // 700 + 1
    assert names == [["a.txt", "b.txt"], ["c.txt"], ["d.txt"]] + [["e.jsonl"]] * big + [["f.txt"]]
    assert [u.index for u in units] == list(range(len(units)))
    ranges = [u.parts[0] for u in units[3:-1]]
    assert ranges[0].start == 0 and ranges[-1].end == len(lines.encode())
    assert all(a.end == b.start for a, b in zip(ranges, ranges[1:]))
    whole = documents(list_and_part(tmp_path / "e.jsonl"))
    assert documents(ranges) == whole and len(whole) == 400  # every line once, same keys (byte offsets)


def list_and_part(path) -> list[Part]:
    f = list_files(str(path))[0]
    return [Part(f.path, f.size, f.key)]


def test_a_big_parquet_is_cut_at_row_groups_with_the_same_row_keys(tmp_path):
    texts = [f"row {i} " + "w" * (i % 30) for i in range(1000)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "big.parquet", row_group_size=100)
    units = plan_units(list_files(str(tmp_path)), unit_bytes=2000)
    assert len(units) > 2 and all(len(u.parts) == 1 for u in units)
    assert documents([u.parts[0] for u in units]) == documents(list_and_part(tmp_path / "big.parquet"))
    assert [t for _, t in documents([u.parts[0] for u in units])] == texts


def test_readers_stream_a_big_compressed_file_in_bounded_memory(tmp_path):
    """A 48 MB .jsonl.gz and a 48 MB plain-text document are read with a Python peak of a few MB."""
    line = json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 20}) + "\n"
    (tmp_path / "big.jsonl.gz").write_bytes(gzip.compress((line * (48_000_000 // len(line))).encode(), 1))
    (tmp_path / "big.txt").write_text("all work and no play makes jack a dull boy\n" * (48_000_000 // 44))
    for name in ("big.jsonl.gz", "big.txt"):
        tracemalloc.start()
        count = sum(len(d.text) for d in read_documents(list_and_part(tmp_path / name)[0], **READ))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert count > 40_000_000 and peak < 12_000_000, (name, peak)


def test_one_huge_jsonl_document_comes_in_chunks(tmp_path):
    text = "word " * 1_000_000  # 5 M characters on one line
    (tmp_path / "one.jsonl").write_text(json.dumps({"text": text}) + "\n")
    docs = list(read_documents(list_and_part(tmp_path / "one.jsonl")[0], **READ))
    assert len(docs) >= 2 and max(len(d.text) for d in docs) < 2 * CHUNK_CHARS
    assert "".join(d.text for d in docs) == text and [d.ends for d in docs] == [False] * (len(docs) - 1) + [True]


def test_tokenizer_sample_is_seeded_capped_per_file_and_reads_only_what_it_uses(tmp_path):
    for i in range(20):
        (tmp_path / f"small-{i:02d}.txt").write_text(f"small file {i}\n" * 50)
    (tmp_path / "huge.txt").write_text("huge file line\n" * 2_000_000)  # 30 MB
    files = list_files(str(tmp_path))
    plan = sample_plan(files, seed=0, sample_mb=1.0, sample_file_mb=0.0625)
    assert plan == sample_plan(files, seed=0, sample_mb=1.0, sample_file_mb=0.0625)
    assert [p.key for p in plan["parts"]] != [p.key for p in sample_plan(files, seed=1, sample_mb=1.0,
                                                                           sample_file_mb=0.0625)["parts"]]
    read_before = io_read_bytes()
    lines = sample_lines(plan["parts"], text_field="text", budget=plan["budget"], per_file=plan["per_file"])
    assert io_read_bytes() - read_before < 4_000_000  # of the 30 MB file, about its first text chunk
    assert sum(line == "huge file line" for line in lines) <= 65536 // 15 + 1  # the per-file cap
    assert len({line for line in lines if line.startswith("small file")}) == 20  # spread over every file


def io_read_bytes() -> int:
    """Bytes this process has read through read() calls (Linux /proc)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])
