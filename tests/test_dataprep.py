"""dataprep on a real local Ray and a real moto S3 endpoint: round trip, determinism, S3, re-runs."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import run_captured, upload_dir
from dataprep import open_dataset
from raylm import storage
from dataprep.__main__ import main

pytestmark = pytest.mark.ray
SMALL = ["--vocab-size", "400", "--seq-len", "16", "--val-fraction", "0.2", "--shard-size", "0.001"]


def prep(inputs, output, *extra) -> tuple[int, str, str]:
    return run_captured(main, ["--input", *inputs, "--output", output, *SMALL, *extra])


def decoded_documents(ds, split: str) -> tuple[list[str], str]:
    """(complete documents, the partial last one) of a split, decoded from its packed rows."""
    rows = getattr(ds, split)
    stream = np.concatenate([rows[i] for i in range(len(rows))]) if len(rows) else np.array([], np.uint16)
    sp = ds.tokenizer()
    cuts = np.flatnonzero(stream == ds.eos_id)
    pieces = np.split(stream, cuts + 1)
    return [sp.decode(p[:-1].tolist()) for p in pieces[:-1]], sp.decode(pieces[-1].tolist())


def assert_round_trip(ds, corpus_docs: list[str]) -> None:
    """Each split decodes to corpus documents in corpus order; together the splits hold every corpus token, and
    only each split's trailing partial row (< row_len tokens) is dropped."""
    from dataprep.tokenizer import encode_exact

    sp = ds.tokenizer()
    assert ds.manifest["tokens"] == sum(len(ids) + 1 for ids in encode_exact(sp, corpus_docs))
    assert ds.manifest["documents"] == len(corpus_docs)
    for split in ("train", "val"):
        docs, partial = decoded_documents(ds, split)
        remaining = iter(corpus_docs)
        assert all(any(d == c for c in remaining) for d in docs), f"{split}: not corpus documents in corpus order"
        # a tail cut inside a multi-byte character decodes to U+FFFD at its end
        assert any(c.startswith(partial.rstrip("\ufffd")) for c in corpus_docs)
        entry = ds.manifest["splits"][split]
        assert 0 <= entry["dropped_tokens"] < ds.manifest["row_len"]
        assert entry["tokens"] == entry["rows"] * ds.manifest["row_len"] + entry["dropped_tokens"]


def test_round_trip_all_formats_cjk_emoji(local_ray, mixed_corpus, tmp_path):
    root, docs = mixed_corpus
    assert prep([root], tmp_path / "ds")[0] == 0
    ds = open_dataset(str(tmp_path / "ds"))
    m = ds.manifest
    assert m["dtype"] == "uint16" and m["row_len"] == 17 and m["tokenizer"]["trained"]
    assert len(ds.train) > 0 and len(ds.val) > 0 and len(m["splits"]["train"]["shards"]) > 1
    assert ds.train[0].shape == (17,) and ds.train[0].dtype == np.uint16
    assert all(s["path"].endswith((".txt", ".md", ".py", ".gz", ".zst", ".parquet")) for s in m["sources"])
    assert_round_trip(ds, docs)


def test_two_runs_are_byte_identical_whatever_the_actor_count_and_rerun_is_noop(local_ray, mixed_corpus, tmp_path):
    root, _ = mixed_corpus
    a, b = tmp_path / "a", tmp_path / "b"
    # b asks for more tokenizer actors (one CPU each) than the 2 CPUs hold: the pool grows as far as it can
    assert prep([root], a)[0] == 0 and prep([root], b, "--num-workers", "4")[0] == 0
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert len(files_a) > 4
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    stamp = (a / "manifest.json").stat().st_mtime_ns
    code, out, _ = prep([root], a)
    assert code == 0 and "nothing to do" in out
    assert (a / "manifest.json").stat().st_mtime_ns == stamp
    code, _, err = prep([root], a, "--seed", "1")
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "seed" in errors[0] and "--overwrite" in errors[0]
    assert prep([root], a, "--seed", "1", "--overwrite")[0] == 0
    assert (a / "manifest.json").read_bytes() != (b / "manifest.json").read_bytes()


@pytest.mark.s3
def test_s3_input_to_s3_output_matches_local(local_ray, mixed_corpus, tmp_path, s3_server):
    root, docs = mixed_corpus
    upload_dir(root, f"{s3_server}/corpus")
    out = f"{s3_server}/datasets/mixed"
    assert prep([f"{s3_server}/corpus/"], out)[0] == 0
    assert prep([root], tmp_path / "local")[0] == 0
    remote, local = open_dataset(out), open_dataset(str(tmp_path / "local"))
    assert remote.manifest["splits"] == local.manifest["splits"]
    for split in ("train", "val"):
        r, l = getattr(remote, split), getattr(local, split)
        assert np.array_equal(r.rows(range(len(r))), l.rows(range(len(l))))
    for shard in remote.manifest["splits"]["train"]["shards"]:
        assert storage.read_bytes(f"{out}/{shard['file']}") == (tmp_path / "local" / shard["file"]).read_bytes()
    assert_round_trip(remote, docs)


def test_given_tokenizer_is_used_and_stamped(local_ray, mixed_corpus, tmp_path):
    root, docs = mixed_corpus
    assert prep([root], tmp_path / "first")[0] == 0
    model = tmp_path / "first" / "tokenizer.model"
    assert prep([root], tmp_path / "second", "--tokenizer", model, "--seq-len", "32")[0] == 0
    ds = open_dataset(str(tmp_path / "second"))
    assert ds.manifest["tokenizer"]["trained"] is False and ds.seq_len == 32
    assert (tmp_path / "second" / "tokenizer.model").read_bytes() == model.read_bytes()
    assert_round_trip(ds, docs)


def test_open_dataset_without_manifest_is_an_error(tmp_path):
    from raylm.errors import DataError

    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="not a finished raylm dataset"):
        open_dataset(str(tmp_path))
