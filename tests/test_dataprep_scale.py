"""Dataprep's driver work that grows with the corpus: big parquet footers read in parallel when planning, the source
list streamed to sources.jsonl."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from dataprep import output
from dataprep.units import pieces, plan_units
from raylm.storage import list_files


def test_parquet_footers_read_in_parallel_plan_the_units_of_reading_them_in_turn(tmp_path):
    """Big parquet files of different row-group layouts between small files: every file's pieces, in the listing's
    order, whichever footer read finished first."""
    for i in range(12):
        texts = [f"file {i} row {r} " + "w" * (r % 17) for r in range(200 + 37 * i)]
        pq.write_table(pa.table({"text": texts}), tmp_path / f"{i:02d}-big.parquet", row_group_size=20 + 5 * i)
        (tmp_path / f"{i:02d}-small.txt").write_text(f"small {i}\n")
    files = list_files(str(tmp_path))
    units = plan_units(files, unit_bytes=1500)
    assert [p for u in units for p in u.parts] == [p for f in files for p, _ in pieces(f, 1500)]
    assert sum(len(pieces(f, 1500)) > 1 for f in files) == 12  # every big file was cut at its row groups


def test_sources_jsonl_is_streamed_and_lists_every_file(tmp_path, monkeypatch):
    monkeypatch.setattr(output, "SOURCES_LINES", 7)
    for i in range(50):
        (tmp_path / "corpus" / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "corpus" / f"d{i % 3}" / f"{i:03d}.txt").write_text("x" * i)
    files = list_files(str(tmp_path / "corpus"))
    (tmp_path / "out").mkdir()
    output.write_sources(str(tmp_path / "out"), files)
    lines = [json.loads(l) for l in (tmp_path / "out" / output.SOURCES).read_text().splitlines()]
    assert lines == [{"path": f.path, "size": f.size} for f in files] and len(lines) == 50
    assert os.listdir(tmp_path / "out") == [output.SOURCES]  # nothing left under a temporary name
