"""dataprep on a real local Ray, a multi-node Ray and a real moto S3 endpoint: round trip, determinism on any
cluster, resume after a SIGKILL, S3, re-runs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest

from dataprep.__main__ import main
from helpers import dataset_files, driver_env, hf_tokenizer_dir, jsonl_corpus, run_captured, upload_dir, wait_for
from raylm import storage
from raylm.dataset import open_dataset

SMALL = ["--vocab-size", "400", "--seq-len", "16", "--val-fraction", "0.2", "--shard-size", "0.001",
         "--pack.unit_mb=0.0005"]


def prep(inputs, output, *extra) -> tuple[int, str, str]:
    return run_captured(main, ["--input", *inputs, "--output", output, *SMALL, *extra])


def unit_streams(ds, split: str) -> list[np.ndarray]:
    """Each unit's token stream of a split, in unit order (a unit's rows are packed on their own)."""
    shards = ds.manifest["splits"][split]["shards"]
    rows, start, streams = getattr(ds, split), 0, {}
    for shard in shards:
        streams.setdefault(shard["unit"], []).append(rows.rows(range(start, start + shard["rows"])).reshape(-1))
        start += shard["rows"]
    return [np.concatenate(streams[u]) for u in sorted(streams)]


def assert_round_trip(ds, corpus_docs: list[str]) -> None:
    """Decoding every unit's rows gives corpus documents in corpus order, each unit ending in a partial document
    (its dropped tail); the counts add up: all corpus tokens = rows x row_len + dropped tails."""
    sp, m = ds.tokenizer(), ds.manifest
    assert m["tokens"] == sum(len(ids) + 1 for ids in sp.encode(corpus_docs))
    assert m["documents"] == len(corpus_docs)
    for split in ("train", "val"):
        remaining = iter(corpus_docs)
        for stream in unit_streams(ds, split):
            pieces = np.split(stream, np.flatnonzero(stream == ds.eos_id) + 1)
            docs = [sp.decode(p[:-1].tolist()) for p in pieces[:-1]]
            assert all(any(d == c for c in remaining) for d in docs), f"{split}: not corpus documents in corpus order"
            # a tail cut inside a multi-byte character decodes to U+FFFD at its end
            assert any(c.startswith(sp.decode(pieces[-1].tolist()).rstrip("\ufffd")) for c in corpus_docs)
        entry = m["splits"][split]
        assert entry["tokens"] == entry["rows"] * m["row_len"] + entry["dropped_tokens"]
        assert 0 <= entry["dropped_tokens"] < m["row_len"] * m["units"]


def test_round_trip_all_formats_cjk_emoji(local_ray, mixed_corpus, tmp_path):
    root, docs = mixed_corpus
    assert prep([root], tmp_path / "ds")[0] == 0
    ds = open_dataset(str(tmp_path / "ds"))
    m = ds.manifest
    assert m["dtype"] == "uint16" and m["row_len"] == 17 and m["tokenizer"]["trained"]
    assert m["units"] >= 4 and len(m["splits"]["train"]["shards"]) > m["units"]
    assert ds.train[0].shape == (17,) and ds.train[0].dtype == np.uint16
    sources = [json.loads(line) for line in (tmp_path / "ds" / "sources.jsonl").read_text().splitlines()]
    assert m["sources"] == {"file": "sources.jsonl", "count": len(sources)} and "sources" not in json.dumps(m["splits"])
    assert all(s["path"].endswith((".txt", ".md", ".py", ".gz", ".zst", ".parquet")) for s in sources)
    assert_round_trip(ds, docs)


def test_same_bytes_on_any_actor_count_block_settings_or_config_form_and_rerun_is_noop(local_ray, mixed_corpus,
                                                                                       tmp_path):
    """One actor with the first version's flags, or up to 4 actors (more than the 2 CPUs hold: the pool grows as
    far as it can), other Ray Data block sizes and a TOML config with `--section.field` overrides: the same bytes."""
    import ray.data

    root, _ = mixed_corpus
    a, b = tmp_path / "a", tmp_path / "b"
    assert prep([root], a, "--num-workers", "1")[0] == 0
    toml = tmp_path / "dataprep.toml"
    toml.write_text(f'[input]\npaths = ["{root}"]\n[tokenizer]\nvocab_size = 400\n'
                    '[pack]\nseq_len = 16\nval_fraction = 0.2\nunit_mb = 0.0005\nshard_mb = 0.001\n')
    context = ray.data.DataContext.get_current()
    saved = context.target_max_block_size, context.target_min_block_size
    context.target_max_block_size, context.target_min_block_size = 4096, 1024
    try:
        assert run_captured(main, ["--config", toml, "--output.dir", b, "--workers.num_workers=4"])[0] == 0
    finally:
        context.target_max_block_size, context.target_min_block_size = saved
    assert dataset_files(a) == dataset_files(b) and len(dataset_files(a)) > 8
    stamp = (a / "manifest.json").stat().st_mtime_ns
    code, out, _ = prep([root], a)
    assert code == 0 and "nothing to do" in out
    assert (a / "manifest.json").stat().st_mtime_ns == stamp
    code, _, err = prep([root], a, "--seed", "1")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "seed" in errors[0] and "--overwrite" in errors[0]
    assert prep([root], a, "--seed", "1", "--overwrite")[0] == 0
    assert (a / "manifest.json").read_bytes() != (b / "manifest.json").read_bytes()


def test_a_killed_driver_resumes_to_the_same_bytes(local_ray, tmp_path):
    """SIGKILL the driver once a unit is committed; the same command again keeps the finished units, redoes the
    rest, and gives the bytes of an uninterrupted run."""
    from ray.util.state import list_actors

    corpus, killed, whole = tmp_path / "corpus", tmp_path / "killed", tmp_path / "whole"
    jsonl_corpus(corpus, files=60, lines=25)  # ~60 units of ~8 kB
    args = ["--input", str(corpus), "--vocab-size", "400", "--seq-len", "16", "--pack.unit_mb=0.008"]
    driver = subprocess.Popen([sys.executable, "-m", "dataprep", *args, "--output", str(killed)],
                              env=driver_env(address := local_ray.get_runtime_context().gcs_address),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for("a committed unit", lambda: any((killed / "_progress").glob("unit-*.json")), driver, timeout=120,
             every=0.02)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert driver.returncode == -signal.SIGKILL, driver.stderr.read().decode()[-2000:]
    assert not (killed / "manifest.json").exists()
    alive = [("state", "=", "ALIVE")]
    wait_for("the killed job's actors to go with it", lambda: not any(
        a.class_name.endswith("PackUnits") for a in list_actors(address=address, filters=alive)), timeout=120)
    (killed / "sources.jsonl.tmp-0123456789ab").write_text("half")  # as if killed while finishing
    code, out, err = run_captured(main, [*args, "--output", killed])
    assert code == 0, err
    reused = int(out.split(" reused")[0].rsplit(", ", 1)[1])
    assert 1 <= reused < 60, out
    assert run_captured(main, [*args, "--output", whole])[0] == 0
    assert dataset_files(killed) == dataset_files(whole)


def test_s3_input_to_s3_output_matches_local(local_ray, mixed_corpus, tmp_path, s3_server):
    root, docs = mixed_corpus
    upload_dir(root, f"{s3_server}/corpus")
    out = f"{s3_server}/datasets/mixed"
    assert prep([f"{s3_server}/corpus/"], out)[0] == 0
    assert prep([root], tmp_path / "local")[0] == 0
    local = dataset_files(tmp_path / "local")
    for rel in set(local) - {"sources.jsonl", "manifest.json"}:  # these two name the sources: local paths here
        assert storage.read_bytes(f"{out}/{rel}") == local[rel], rel
    remote_manifest, local_manifest = json.loads(storage.read_bytes(f"{out}/manifest.json")), json.loads(local["manifest.json"])
    assert remote_manifest["settings"].pop("sources_sha256") != local_manifest["settings"].pop("sources_sha256")
    assert remote_manifest == local_manifest
    assert_round_trip(open_dataset(out), docs)


def test_given_tokenizer_is_used_and_stamped(local_ray, mixed_corpus, tmp_path):
    root, docs = mixed_corpus
    assert prep([root], tmp_path / "first")[0] == 0
    model = tmp_path / "first" / "tokenizer.model"
    assert prep([root], tmp_path / "second", "--tokenizer", model, "--seq-len", "32")[0] == 0
    ds = open_dataset(str(tmp_path / "second"))
    assert ds.manifest["tokenizer"]["trained"] is False and ds.seq_len == 32
    assert (tmp_path / "second" / "tokenizer.model").read_bytes() == model.read_bytes()
    assert_round_trip(ds, docs)


def test_a_hugging_face_tokenizer_json_dataset_round_trips_text(local_ray, mixed_corpus, tmp_path):
    """A Llama-3-style tokenizer.json (byte-level BPE, special tokens, chat template beside it) tokenizes the corpus;
    every document decodes back exactly, and the dataset carries the tokenizer's files."""
    root, docs = mixed_corpus
    folder = hf_tokenizer_dir(tmp_path / "llama-tokenizer", docs * 3)
    code, _, err = prep([root], tmp_path / "ds", "--tokenizer", f"{folder}/tokenizer.json")
    assert code == 0, err
    ds = open_dataset(str(tmp_path / "ds"))
    entry = ds.manifest["tokenizer"]
    assert entry["kind"] == "huggingface" and entry["files"] == ["tokenizer.json", "tokenizer_config.json"]
    assert entry["eos_id"] == ds.tokenizer().eos_id == 1 and entry["trained"] is False
    assert_round_trip(ds, docs)


def test_open_dataset_without_manifest_is_an_error(tmp_path):
    from raylm.errors import DataError

    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="not a finished raylm dataset"):
        open_dataset(str(tmp_path))
