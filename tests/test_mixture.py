"""Data mixtures: every step holds each source's share of the batch to within a row, the whole run its weights to
0.5 %, the same rows on any world size, a schedule switches at its step (across a resume too), nothing grows with
the rows, and a mix that names no source or needs too many epochs stops in one line before compute."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from helpers import jsonl_corpus, losses, metrics, run_captured, trainer_cli, within
from raylm.dataset import open_dataset, open_datasets
from trainer.data import BatchPlan, StepLoader
from trainer.job import DataConfig
from trainer.mixture import MixtureOrder, Source, mixture_order

SOURCES = {"web": 30, "code": 12, "math": 4}
"""Each source's .jsonl files (25 short documents each): three sizes, so the small one runs out first."""


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> str:
    """A dataset of three sources (one --input each), 32-token rows, made in-process without Ray."""
    from dataprep.__main__ import main

    root = tmp_path_factory.mktemp("mix")
    for name, files in SOURCES.items():
        jsonl_corpus(root / name, files=files, lines=25)
    code, _, err = run_captured(main, ["--input", *(str(root / name) for name in SOURCES), "--output", root / "ds",
                                       "--vocab-size", "300", "--seq-len", "32", "--val-fraction", "0.05",
                                       "--workers.local=true"])
    assert code == 0, err
    return str(root / "ds")


@pytest.fixture(scope="module")
def others(mixed, tmp_path_factory) -> dict[str, str]:
    """Datasets beside `mixed`: extra (another corpus, mixed's tokenizer), seq16 (mixed's tokenizer, 16-token rows)
    and own (its own tokenizer)."""
    from dataprep.__main__ import main

    root = tmp_path_factory.mktemp("others")
    jsonl_corpus(root / "corpus", files=6, lines=25)
    made = {}
    for name, args in (("extra", ["--tokenizer", mixed, "--seq-len", "32"]),
                       ("seq16", ["--tokenizer", mixed, "--seq-len", "16"]),
                       ("own", ["--vocab-size", "310", "--seq-len", "32"])):
        code, _, err = run_captured(main, ["--input", root / "corpus", "--output", root / name, *args,
                                           "--val-fraction", "0.05", "--workers.local=true"])
        assert code == 0, err
        made[name] = str(root / name)
    return made


def step_sources(order, dataset, step: int) -> np.ndarray:
    """The recorded source of each row the order gives the step (read from the dataset, not from the order)."""
    _, rows = order.step(step)
    return dataset.train.row_sources()[rows]


def test_every_step_holds_each_source_within_a_row_and_the_run_its_weights(mixed):
    ds = open_dataset(mixed)
    assert ds.source_names == list(SOURCES)
    weights, batch = np.array([0.6, 0.3, 0.1]), 24
    order = mixture_order(DataConfig(mix={"web": 0.6, "code": 0.3, "math": 0.1}), ds, batch=batch)
    total, seen = np.zeros(3), {s: [] for s in range(3)}
    for step in range(200):
        sources = step_sources(order, ds, step)
        counts = np.bincount(sources, minlength=3)
        assert (np.abs(counts / batch - weights) <= 1 / batch + 1e-12).all(), (step, counts)
        total += counts
        for s in range(3):
            seen[s] += order.step(step)[1][sources == s].tolist()
    assert np.abs(total / total.sum() - weights).max() <= 0.005, total
    ranges = ds.train.source_ranges()
    for s, rows in seen.items():  # each source walks its own permutation: no row again before its epoch ends
        size = sum(stop - start for start, stop in ranges[s])
        first = rows[:size]
        assert len(set(first)) == len(first), s
        assert order.epochs(200)[s] == pytest.approx(len(rows) / size)


def test_any_world_size_reads_the_same_rows_and_a_schedule_switches_at_its_step(mixed):
    """W=1 and W=3 (shares 4, 4, 3 of 11) take the same rows at every step; the schedule's second phase starts at
    step 50 exactly: no math row before it, math's share after it."""
    ds = open_dataset(mixed)
    data = DataConfig(mix_schedule="0:web=0.7,code=0.3; 50:web=0.2,math=0.8", seed=3)
    order = mixture_order(data, ds, batch=11)
    for step in (0, 48, 49, 50, 51, 77):
        rows = {}
        for world in (1, 3):
            plan = BatchPlan(global_batch=11, micro_batch=2, world=world)
            rows[world] = np.concatenate([StepLoader(ds.train, plan=plan, rank=r, seed=3, order=order).rank_rows(step)
                                          for r in range(world)])
        assert np.array_equal(rows[1], rows[3]) and np.array_equal(rows[1], order.step(step)[1])
        counts = np.bincount(step_sources(order, ds, step), minlength=3)
        if step < 50:
            assert counts[2] == 0 and abs(counts[0] - 7.7) < 1, (step, counts)
        else:
            assert counts[1] == 0 and abs(counts[2] - 8.8) < 1, (step, counts)


def test_nothing_grows_with_the_rows_of_a_source():
    """Two sources of a billion rows each: a step's rows come from O(1) state (a few permutations and the
    apportionment's one-period table), whatever the step."""
    huge = [Source("a", ((0, 10**9),)), Source("b", ((10**9, 2 * 10**9),))]
    tracemalloc.start()
    order = MixtureOrder(huge, [(0, np.array([0.25, 0.75]))], batch=1024, seed=0)
    which, rows = order.step(10**6)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 << 20, peak
    assert np.bincount(which).tolist() == [256, 768] and rows[which == 1].min() >= 10**9


@pytest.mark.parametrize("args, expected", [
    (["--data.mix=web=0.5,books=0.5"], "--data.mix: 'books' is not a source of this dataset (its sources: web, code, "
                                       "math)"),
    (["--data.mix=web=1,code=1,math=1", "--data.max_epochs=3", "--train.steps=420"],  # 16/3 rows a step
     "source math (722 train rows) would need 4 epochs in train.steps=420 under this mix, more than "
     "data.max_epochs=3"),
    (["--data.mix=web=1", "--data.mix_schedule=0:web=1"], "data.mix and data.mix_schedule both set the weights"),
    (["--data.mix_schedule=10:web=1"], "--data.mix_schedule must start at step 0"),
    (["--data.mix=web=-1,code=1"], "the weight of web must be a finite number >= 0"),
])
def test_a_bad_mix_is_one_line_before_compute(mixed, tmp_path, args, expected):
    from trainer.__main__ import main

    code, _, err = run_captured(main, ["--no-ray", "--config", "configs/tiny.toml", "--data.path", mixed,
                                       "--run.dir", tmp_path / "run", *args])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.heavy
def test_a_mixed_run_is_the_same_on_any_world_size_across_a_kill_and_a_schedule_switch(mixed, tmp_path):
    """40 steps whose mix switches at step 33: W=3 logs W=1's losses; a W=1 run killed at step 37 resumes from its
    step-30 checkpoint (before the switch) and logs the same losses; every log line has each source's tokens."""
    common = ["--data.path", mixed, "--train.steps=40", "--train.log_every=1", "--train.eval_every=20",
              "--checkpoint.every=10", "--train.global_batch=12", "--train.micro_batch=4",
              "--data.mix_schedule=0:web=0.5,code=0.4,math=0.1; 33:web=0.2,math=0.8"]
    one = trainer_cli(*common, "--run.dir", str(tmp_path / "w1"))
    assert one.returncode == 0, one.stderr[-3000:]
    three = trainer_cli(*common, "--run.dir", str(tmp_path / "w3"), torchrun=3)
    assert three.returncode == 0, three.stderr[-3000:]
    reference = losses(str(tmp_path / "w1"))
    assert len(reference) == 40 and within(losses(str(tmp_path / "w3")), reference)

    killed = tmp_path / "killed"
    assert trainer_cli(*common, "--run.dir", str(killed), "--fault.kill_at_step=37").returncode != 0
    again = trainer_cli(*common, "--run.dir", str(killed))
    assert again.returncode == 0 and "at step 30" in again.stderr, again.stderr[-3000:]
    assert within(losses(str(killed)), reference)

    last = metrics(str(tmp_path / "w1"))[-1]
    rows = {name: last[f"data/{name}/tokens"] // 32 for name in SOURCES}
    assert sum(rows.values()) == 40 * 12 and abs(rows["math"] - (33 * 12 * 0.1 + 7 * 12 * 0.8)) < 2, rows
    assert "data: web " in one.stdout and " epochs)" in one.stdout


def test_several_datasets_train_as_one_with_their_sources_side_by_side(mixed, others, tmp_path):
    """`--data.path A B`: A's three sources and B (one source, named after its directory) in one mix; each row the
    order gives is read from the dataset its source is in; the run logs each source's tokens."""
    from trainer.__main__ import main

    both = open_datasets([mixed, others["extra"]])
    assert both.source_names == ["web", "code", "math", "extra"] and both.seq_len == 32
    assert len(both.train) == len(open_dataset(mixed).train) + len(open_dataset(others["extra"]).train)
    order = mixture_order(DataConfig(mix={"web": 0.4, "extra": 0.6}), both, batch=10)
    which, rows = order.step(5)
    assert np.bincount(which, minlength=4).tolist() == [4, 0, 0, 6]
    assert np.array_equal(both.train.row_sources()[rows], which)
    extra = open_dataset(others["extra"]).train
    first_extra = len(open_dataset(mixed).train)
    assert np.array_equal(both.train.rows(rows[which == 3]), extra.rows(rows[which == 3] - first_extra))

    code, out, err = run_captured(main, ["--no-ray", "--config", "configs/tiny.toml", "--data.path", mixed,
                                         others["extra"], "--data.mix=web=0.5,extra=0.5", "--train.steps=4",
                                         "--train.log_every=2", "--run.dir", tmp_path / "run"])
    assert code == 0, err
    assert metrics(str(tmp_path / "run"))[-1]["data/extra/tokens"] == 4 * 16 // 2 * 32 and "data: web " in out


@pytest.mark.parametrize("other, expected", [
    ("own", "were made with different tokenizers: prepare"),
    ("seq16", "differ in seq_len (32 vs 16): prepare them with the same --seq-len"),
])
def test_datasets_that_cannot_train_together_are_one_line(mixed, others, tmp_path, other, expected):
    from trainer.__main__ import main

    code, _, err = run_captured(main, ["--no-ray", "--config", "configs/tiny.toml", "--data.path", mixed,
                                       others[other], "--run.dir", tmp_path / "run"])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and expected in lines[0], err


def test_a_run_resumes_only_under_its_own_mix(mixed, tmp_path):
    """The mix is part of the data order a checkpoint records: continuing it under another mix, or none, is refused
    in one line naming it; under the same mix it continues."""
    from trainer.__main__ import main

    run = ["--no-ray", "--config", "configs/tiny.toml", "--data.path", mixed, "--run.dir", tmp_path / "run",
           "--checkpoint.every=2", "--train.log_every=2"]
    assert run_captured(main, [*run, "--train.steps=2", "--data.mix=web=0.5,code=0.5"])[0] == 0
    for other in (["--data.mix=web=0.4,code=0.6"], []):
        code, _, err = run_captured(main, [*run, "--train.steps=4", *other])
        assert code == 2 and "data mix" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = run_captured(main, [*run, "--train.steps=4", "--data.mix=web=0.5,code=0.5"])
    assert code == 0 and "resumed from" in err, err


def test_a_study_searches_a_source_weight_beside_the_lr(local_ray, mixed, tmp_path):
    """`--tune.mix math=0.1,1` beside `--data.mix web=1,code=1`: two trials, each trained on its weight of math (its
    metrics say so), the weight in results.csv and the trial's name, and best.toml's data.mix keeps web and code."""
    import csv
    import os
    import subprocess
    import sys
    import tomllib

    from helpers import TINY

    tune_dir = tmp_path / "study"
    tiny = [arg for arg in TINY if not arg.startswith("--optim.warmup_steps")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": local_ray.get_runtime_context().gcs_address}
    study = subprocess.run([sys.executable, "-m", "tune", *tiny, "--data.path", mixed, "--data.mix=web=1,code=1",
                            "--tune.lr=3e-3", "--tune.mix=math=0.1,1", "--tune.batch=16", "--tune.marks=2",
                            "--tune.grace_marks=2", "--tune.budget_tokens=4096", "--ray.num_workers=1", "--tune.dir",
                            str(tune_dir)],  # 8 steps a trial, each to the end (ASHA stops none)
                           capture_output=True, text=True, env=env, timeout=600)
    assert study.returncode == 0, (study.stdout + study.stderr)[-3000:]
    rows = list(csv.DictReader((tune_dir / "results.csv").open()))
    assert sorted(float(r["math_weight"]) for r in rows) == [0.1, 1.0] and {r["status"] for r in rows} == {"completed"}
    for row in rows:
        weight = float(row["math_weight"])
        assert row["trial"].endswith(f"-mix{weight:.3g}")
        last = metrics(str(tune_dir / "trials" / row["trial"]))[-1]
        math_share = last["data/math/tokens"] / (last["data/web/tokens"] + last["data/code/tokens"] +
                                                 last["data/math/tokens"])
        assert abs(math_share - weight / (2 + weight)) < 0.05, (weight, math_share)
    best = tomllib.loads((tune_dir / "best.toml").read_text())["data"]["mix"]
    assert best["web"] == best["code"] == 1.0 and best["math"] in (0.1, 1.0)
    assert f"math_weight {best['math']:.3g}" in study.stdout, study.stdout[-2000:]


def test_a_dataset_of_several_sources_is_weighed_as_a_whole_and_a_schedule_is_also_a_toml_list(mixed, others,
                                                                                                 tmp_path):
    """Beside another dataset, a dataset of several sources may be named by its directory: its weight is shared by
    its sources in proportion to their rows. A schedule written as a TOML list of tables is the same schedule (and
    the same data order in a checkpoint) as its command-line string."""
    from raylm.config import load_config
    from trainer.job import JobConfig
    from trainer.mixture import mix_spec

    both = open_datasets([mixed, others["extra"]])
    assert both.groups == {"ds": [0, 1, 2]}
    rows = [sum(b - a for a, b in spans) for _, spans in sorted(both.train.source_ranges().items())]
    order = mixture_order(DataConfig(mix={"ds": 0.5, "extra": 0.5}), both, batch=16)
    expected = [0.5 * r / sum(rows[:3]) for r in rows[:3]] + [0.5]
    assert np.allclose(order.rows_before(4096) / (4096 * 16), expected, atol=1e-4)
    with pytest.raises(Exception, match="ds is weighed as a whole and by its sources"):
        mixture_order(DataConfig(mix={"ds": 0.5, "web": 0.5}), both, batch=16)

    toml = tmp_path / "mix.toml"
    toml.write_text("[data]\nmix_schedule = [{step = 0, web = 0.7, code = 0.3}, {step = 50, web = 0.2, math = 0.8}]\n")
    listed = load_config(JobConfig, str(toml), [])
    given = load_config(JobConfig, None, ["--data.mix_schedule=0:web=0.7,code=0.3; 50:web=0.2,math=0.8"])
    ds = open_dataset(mixed)
    for step in (0, 49, 50, 99):
        assert np.array_equal(mixture_order(listed.data, ds, batch=11).step(step)[1],
                              mixture_order(given.data, ds, batch=11).step(step)[1])
    assert mix_spec(listed.data) == mix_spec(given.data)
