"""Ray Tune studies of the tiny preset on the stdlib test dataset: divergence, resume, bad inputs (a random study with
ASHA, over two nodes and on S3: tests/test_multinode.py)."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import signal
import subprocess
import sys
import tomllib

import pytest
from pathlib import Path

from helpers import STUDY, run_captured, wait_for
from raylm import storage
from raylm.ray_session import free_port
from trainer.checkpoint import list_checkpoints

def read_results(tune_dir) -> list[dict]:
    return list(csv.DictReader(io.StringIO(storage.read_bytes(storage.join(str(tune_dir), "results.csv")).decode())))


def tune_cli(ray_address: str, *args: str) -> subprocess.Popen:
    """`python -m tune` as a user runs it against a running cluster. One Ray per machine: Ray Train's
    PlacementGroupCleaner cannot reach the State API when it finds two, and stopped trials would keep their CPUs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ray_address}
    return subprocess.Popen([sys.executable, "-m", "tune", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, start_new_session=True)


def a_trial_finished(tune_dir) -> bool:
    """Tune's saved experiment state records a terminated trial (so a resume knows it is done)."""
    for state in glob.glob(str(tune_dir / "study" / "experiment_state*.json")):
        with open(state) as f:
            if "TERMINATED" in f.read():
                return True
    return False


def a_stale_ray_record(tune_dir, last_step: int) -> bool:
    """A running trial's Ray Train record names a checkpoint raylm has pruned since (with keep=1, from its second
    commit on): the moment a killed study used to leave unresumable."""
    for record in glob.glob(str(tune_dir / "trials" / "*" / "checkpoint_manager_snapshot.json")):
        if os.path.exists(os.path.join(os.path.dirname(record), "checkpoints", f"step-{last_step:06d}")):
            continue  # a finished trial's
        try:
            with open(record) as f:
                names = [r["checkpoint_dir_name"] for r in json.load(f)["checkpoint_results"]]
        except (OSError, ValueError):
            continue  # being written
        if any(not os.path.exists(os.path.join(os.path.dirname(record), n)) for n in names):
            return True
    return False


def test_killed_grid_study_resumes_and_never_picks_a_diverged_or_tiny_lr(local_ray, stdlib_dataset, tmp_path):
    tune_dir = tmp_path / "grid"
    args = [*STUDY, "--tune.batch=8", "--tune.lr=1e-6,3e-3,30", "--data.path", stdlib_dataset, "--tune.dir",
            str(tune_dir), "--tune.max_concurrent=1", "--ray.num_workers=2"]  # FSDP over 2 ranks per trial
    address = local_ray.get_runtime_context().gcs_address
    first = tune_cli(address, *args)
    try:
        wait_for("a finished trial", lambda: a_trial_finished(tune_dir), first, every=0.5)
        wait_for("a trial's record naming a pruned checkpoint",
                 lambda: a_stale_ray_record(tune_dir, last_step=40), first, every=0.1)
    finally:  # also when a wait fails: a study left running would hold the session's CPUs for the next tests
        os.killpg(first.pid, signal.SIGKILL)  # the study's driver dies at once; Ray ends its trials with it
    first.wait()
    finished = {d: (d / "metrics.jsonl").read_bytes() for d in (tune_dir / "trials").iterdir()
                if list_checkpoints(str(d)) and list_checkpoints(str(d))[-1][0] == 40}
    assert finished, "the first trial's run is not complete"

    again = tune_cli(address, *args, "--tune.resume")
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out[-3000:]
    for run_dir, metrics in finished.items():
        assert (run_dir / "metrics.jsonl").read_bytes() == metrics, f"{run_dir.name} was trained again"
    results = read_results(tune_dir)
    rows = {float(r["lr"]): r for r in results}
    assert len(results) == 3 and sorted(rows) == [1e-6, 3e-3, 30.0]
    assert rows[30.0]["status"] == "diverged" and rows[3e-3]["status"] == "completed"
    assert "best: lr 0.003, global batch 8" in out


def test_ctrl_c_stops_a_study_that_then_resumes_quietly(local_ray, stdlib_dataset, tmp_path):
    """Ctrl-C after a trial started: exit 130 with raylm's one line (not Tune's Tuner.restore advice), the trial
    labelled interrupted, no outputs of a partial study; the resume prints no more of Tune than a first run does,
    and the trial's whole name (not Tune's, cut at 28 characters in the table) names its run directory too."""
    tune_dir = tmp_path / "study"
    args = [*STUDY, "--tune.batch=16", "--tune.budget_tokens=10240", "--tune.marks=2", "--tune.lr=3e-3",
            "--data.path", stdlib_dataset, "--tune.dir", str(tune_dir)]  # 10 steps, twice TINY's warmup
    address = local_ray.get_runtime_context().gcs_address
    first = tune_cli(address, *args)
    lines = []
    for line in first.stdout:
        lines.append(line)
        if ": started" in line:
            first.send_signal(signal.SIGINT)
            break
    out = "".join(lines) + first.communicate(timeout=120)[0]
    assert first.returncode == 130, out[-3000:]
    assert out.strip().splitlines()[-1] == "interrupted: run the same command with --tune.resume to continue", out
    assert "Tuner.restore" not in out and "interrupted at " in out, out
    assert not (tune_dir / "best.toml").exists() and not (tune_dir / "results.csv").exists()

    again = tune_cli(address, *args, "--tune.resume")
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0 and "best: lr 0.003, global batch 16" in out, out[-3000:]
    assert "Configuration for experiment" not in out and "To visualize your results with TensorBoard" not in out, out
    name = re.search(r"^trial (\S+-lr3\.00e-03-b16): started$", out, re.M)[1]  # whole, in every place it shows
    assert (tune_dir / "trials" / name).is_dir() and re.search(rf"^{name} +3\.00e-03 +16 ", out, re.M), out


@pytest.mark.parametrize("arg, expected", [
    ("--tune.lr=1e-2:1e-4", "tune.lr=1e-2:1e-4 must be LOW:HIGH with LOW < HIGH"),
    ("--tune.batch=", "tune.batch=[] must list at least one global batch size"),
    ("--tune.lr=abc", "tune.lr='abc': 'abc' is not a number"),
    ("--tune.resume", "holds no study to resume"),
    ("--tune.batch=8,1", "train.global_batch=1 is smaller than the 2 workers"),
    ("--tune.batch=8,100000", "train rows, fewer than one step takes (train.global_batch=100000)"),
    ("--tune.beta=0.1:1", "tune.beta=0.1:1 searches DPO's β: it needs --train.objective=dpo"),
])
def test_bad_inputs_are_one_line_errors(stdlib_dataset, tmp_path, arg, expected):
    from tune.__main__ import main

    code, _, err = run_captured(main, ["--data.path", stdlib_dataset, "--tune.dir", tmp_path, arg])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err


@pytest.mark.parametrize("args, expected", [
    (["--tune.beta=0.1:1", "--tune.lr=1e-3,3e-3"], "tune.beta=0.1:1 must take tune.lr's form (1e-3,3e-3)"),
    (["--tune.beta=0,1", "--tune.lr=1e-3,3e-3"], "tune.beta='0,1': every value must be > 0"),
    (["--train.objective=lm"], "holds preference pairs; train on it with --train.objective=dpo"),
])
def test_bad_dpo_studies_are_one_line_errors(pairs_data, tmp_path, args, expected):
    from tune.__main__ import main

    code, _, err = run_captured(main, ["--train.objective=dpo", "--data.path", pairs_data["pref"], "--tune.dir",
                                       tmp_path, "--tune.batch=16", *args])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err


def test_a_dpo_study_searches_lr_and_beta_over_one_reference_pass(local_ray, pairs_data, tmp_path):
    """A grid of 2 lrs × 2 βs on preference pairs: the reference log-probs are scored once, before any trial, and
    every trial reads them (its first metrics line: 0 rows scored by it); trials are ranked by held-out reward
    accuracy, the DPO loss's scale being β's; best.toml has the best trial's lr and β."""
    from helpers import TINY, metrics

    tune_dir = tmp_path / "dpo"
    tiny = [arg for arg in TINY if not arg.startswith("--optim.warmup_steps")]  # trials warm up over 10 % of theirs
    args = [*tiny, "--train.objective=dpo", "--train.micro_batch=4", "--data.path", pairs_data["pref"],
            "--tune.lr=1e-3,3e-3", "--tune.beta=0.1,1", "--tune.batch=16", "--tune.marks=2",
            "--tune.budget_tokens=16384", "--ray.num_workers=1", "--tune.dir", str(tune_dir)]  # 8 steps a trial
    study = tune_cli(local_ray.get_runtime_context().gcs_address, *args)
    out, _ = study.communicate(timeout=600)
    assert study.returncode == 0, out[-3000:]
    where = tune_dir / "reference"
    assert re.search(rf"^reference log-probs: [\d,]+ rows scored in [\d.]+ s into {where}, for every trial$", out,
                     re.M), out
    trials = sorted((tune_dir / "trials").iterdir())
    assert len(trials) == 4 and all(metrics(str(t))[0]["reference_rows"] == 0 for t in trials), out

    rows = read_results(tune_dir)
    assert sorted((float(r["lr"]), float(r["beta"])) for r in rows) == [(1e-3, 0.1), (1e-3, 1), (3e-3, 0.1), (3e-3, 1)]
    completed = [r for r in rows if r["status"] == "completed"]
    best = max(completed, key=lambda r: float(r["final_val_reward_accuracy"]))
    assert f"best: lr {float(best['lr']):.3g}, beta {float(best['beta']):.3g}, global batch 16 (val reward " \
           "accuracy" in out, out[-3000:]
    tuned = tomllib.loads((tune_dir / "best.toml").read_text())
    assert (tuned["optim"]["lr"], tuned["dpo"]["beta"]) == (float(best["lr"]), float(best["beta"]))


def test_a_dataset_without_validation_rows_is_refused_before_any_trial(stdlib_dataset, tmp_path):
    """Trials are compared on validation loss: a study that could compare nothing stops before compute is spent."""
    from tune.__main__ import main

    no_val = tmp_path / "no-val"
    no_val.mkdir()
    manifest = json.loads((Path(stdlib_dataset) / "manifest.json").read_text())
    manifest["splits"]["val"] = {**manifest["splits"]["val"], "shards": [], "rows": 0}
    (no_val / "manifest.json").write_text(json.dumps(manifest))
    for name in ("train", *manifest["tokenizer"]["files"]):
        (no_val / name).symlink_to(Path(stdlib_dataset) / name)
    code, _, err = run_captured(main, ["--data.path", no_val, "--tune.dir", tmp_path / "study"])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "has no validation rows" in lines[0], err
    assert not (tmp_path / "study").exists()


def test_missing_dataset_is_a_one_line_error(tmp_path):
    from tune.__main__ import main

    code, _, err = run_captured(main, ["--data.path", tmp_path / "missing", "--tune.dir", tmp_path])
    assert code == 2 and "is not a finished raylm dataset" in err and len(err.strip().splitlines()) == 1


def test_ray_without_dashboard_is_a_one_line_error(own_ray_env, stdlib_dataset, tmp_path):
    """Ray frees a stopped trial's workers through the State API: without the dashboard the study would hang."""
    script = ("import ray, sys\n"
              "ray.init(num_cpus=1, include_dashboard=False, logging_level='ERROR')\n"
              "from raylm.cli import run_cli\n"
              "from tune.__main__ import main\n"
              "sys.exit(run_cli(main, sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", script, "--data.path", stdlib_dataset, "--tune.dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=120,
                          env={**own_ray_env, "RAY_GCS_SERVER_PORT": str(free_port())})  # a GCS of its own
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "without its dashboard" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
