"""Sources: each input of dataprep is one source (web, code, …). Rows and shards never mix sources, the manifest
names each shard's source and counts each split by source, and a one-input dataset keeps the shard names and
settings stamp it always had."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from dataprep.__main__ import main
from dataprep.pipeline import source_names
from helpers import dataset_files, run_captured
from raylm.dataset import PackedDataset, open_dataset
from raylm.errors import ConfigError

DOC_CHARS, DOCS, FILES = 60, 20, 3
"""Every document is DOC_CHARS ASCII characters, so every file is the same size and a unit of two files holds the
last file of one source and the first of the next."""
SMALL = ["--vocab-size", "400", "--seq-len", "16", "--val-fraction", "0.3", "--shard-size", "0.001",
         f"--pack.unit_mb={2.1 * DOCS * (DOC_CHARS + 13) / 2**20}"]
ALPHABETS = {"web": "alpha beta gamma delta kappa sigma omega river mountain forest ocean".split(),
             "code": "X1 = Y22 + Z333 ; QQ7 * W8 - V9 ; K10 = M42".split()}
"""Each source's words: lowercase letters only, or capitals, digits and symbols only, so a decoded row tells its
source."""


def write_source(root, words: list[str]) -> None:
    """FILES .jsonl files of DOCS documents of `words`, each document DOC_CHARS characters."""
    root.mkdir()
    for f in range(FILES):
        docs = ((" ".join(words[(f + d + k) % len(words)] for k in range(40)))[:DOC_CHARS] for d in range(DOCS))
        (root / f"part-{f}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))


def alphabet(text: str) -> str:
    """The source whose alphabet `text` is written in ('mixed' if both)."""
    lower, other = bool(re.search(r"[a-z]", text)), bool(re.search(r"[A-Z0-9]", text))
    return "mixed" if lower and other else "web" if lower else "code"


def prep(inputs, output) -> str:
    code, out, err = run_captured(main, ["--input", *inputs, "--output", output, *SMALL])
    assert code == 0, err[-3000:]
    return out


def test_a_source_is_named_after_its_input():
    assert source_names(["data/web/", "s3://b/dolma/books/*.json.gz", "corpus/wiki.jsonl.gz"]) == ["web", "books",
                                                                                                 "wiki"]
    assert source_names(["corpus/**/*.py", "notes.txt", "s3://bucket/", "README"]) == ["corpus", "notes", "bucket",
                                                                                        "README"]
    assert source_names(["a/web", "b/web/", "code"]) == ["a/web", "b/web", "code"]
    with pytest.raises(ConfigError, match="given twice"):
        source_names(["data/web", "data/web/"])


def test_a_manifest_made_before_sources_opens_without_them(tmp_path):
    old = {"seq_len": 16, "row_len": 17, "dtype": "uint16", "rows_per_batch": 100,
           "splits": {"val": {"shards": [{"file": "val/unit-000000-000.arrow", "rows": 3}]}}}
    ds = PackedDataset(str(tmp_path), old)
    assert ds.source_names == [] and ds.val.row_sources() is None and len(ds.val) == 3


def test_rows_never_mix_sources_and_the_manifest_counts_each(local_ray, tmp_path):
    for name, words in ALPHABETS.items():
        write_source(tmp_path / name, words)
    inputs = [tmp_path / "web", tmp_path / "code"]
    out = prep(inputs, tmp_path / "a")
    ds = open_dataset(str(tmp_path / "a"))
    m = ds.manifest
    assert ds.source_names == m["settings"]["sources"] == ["web", "code"]
    assert f"val rows by source: web {m['splits']['val']['by_source']['web']['rows']:,}, code" in out
    units = {}
    for split in ("train", "val"):
        entry, rows = m["splits"][split], getattr(ds, split)
        shards = entry["shards"]
        for shard in shards:
            assert re.fullmatch(rf"{split}/unit-\d{{6}}-s{shard['source']:03d}-\d{{3}}\.arrow", shard["file"])
            units.setdefault(shard["unit"], set()).add(shard["source"])
        sources = rows.row_sources()
        assert sources.dtype == np.int32 and len(sources) == len(rows) == entry["rows"] > 0
        assert np.array_equal(sources, np.repeat([s["source"] for s in shards], [s["rows"] for s in shards]))
        tokenizer = ds.tokenizer()
        written = [alphabet(tokenizer.decode([t for t in row.tolist() if t != ds.eos_id]))
                   for row in rows.rows(range(len(rows)))]
        assert written == [ds.source_names[s] for s in sources]
        by_source = entry["by_source"]
        for k in ("rows", "tokens", "documents"):
            assert sum(counts[k] for counts in by_source.values()) == entry[k], (split, k)
        assert [by_source[name]["rows"] for name in ds.source_names] == np.bincount(sources, minlength=2).tolist()
    assert {0, 1} in units.values(), "no unit held files of both sources: the test checks nothing"
    prep(inputs, tmp_path / "b")
    assert dataset_files(tmp_path / "a") == dataset_files(tmp_path / "b")


def test_one_input_keeps_the_shard_names_and_stamp_it_always_had(local_ray, tmp_path):
    write_source(tmp_path / "web", ALPHABETS["web"])
    prep([tmp_path / "web"], tmp_path / "ds")
    ds = open_dataset(str(tmp_path / "ds"))
    m = ds.manifest
    assert ds.source_names == ["web"] and "sources" not in m["settings"]
    for split in ("train", "val"):
        shards = m["splits"][split]["shards"]
        assert shards and all(re.fullmatch(rf"{split}/unit-\d{{6}}-\d{{3}}\.arrow", s["file"]) for s in shards)
        assert "by_source" not in m["splits"][split]
        assert not getattr(ds, split).row_sources().any()
