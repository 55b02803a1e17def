"""A preemption notice is acted on within the step it lands in: 2 gloo ranks of `python -m trainer --no-ray`, one of
which signals itself in the middle of step 3, commit step 3 and stop, and the resumed run has an uninterrupted run's
losses.
The grace period is checked against measured step and save times: one warning, from this run's figures or, before
the first step of a resumed run, from those its run directory recorded."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from helpers import TINY, losses, metrics, run_captured, within, write_packed_dataset
from raylm.ray_session import free_port
from raylm.tokenizer import load_tokenizer, train_tokenizer
from trainer.checkpoint import list_checkpoints

WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river mountain forest ocean".split()
STEPS = ["--train.steps=6", "--train.log_every=1", "--train.eval_every=0", "--train.eval_rows=0",
         "--checkpoint.every=0"]
WARNING = re.compile(r"checkpoint\.preempt_grace_s=0\.001s cannot cover a preemption notice: one step \(([\d.]+)s\) "
                     r"\+ one save to its commit \(([\d.]+)s\) = ([\d.]+)s, as (.+) measured; raise "
                     r"--checkpoint\.preempt_grace_s above that and the platform's grace with it \(KubeRay: "
                     r"terminationGracePeriodSeconds")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """A small dataset made in this process (no Ray): 64-token rows of word lists, a few hundred of them."""
    docs = [f"doc {i}: " + " ".join(WORDS[(i * 7 + k * (i % 5 + 1)) % len(WORDS)] + str(k * i % 97) for k in range(30))
            for i in range(600)]
    tokenizer = load_tokenizer(train_tokenizer(docs, vocab_size=400, num_threads=1))
    return write_packed_dataset(tmp_path_factory.mktemp("preempt") / "ds", tokenizer,
                                {"train": {"words": docs}, "val": {"words": docs[:60]}}, seq_len=64)


def cli_rank(rank: int, world: int, port: int, argv: list, out: str) -> None:
    """One rank of `python -m trainer --no-ray` started as torchrun starts it, whose exit code and stderr go to
    out/rank-R.json. (torchrun itself would SIGTERM the rank still closing its run when the other exits with 2.)"""
    from trainer.__main__ import main

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    code, _, err = run_captured(main, argv)
    Path(out, f"rank-{rank}.json").write_text(json.dumps({"code": code, "err": err}))


def two_ranks(argv: list, out: Path) -> list[dict]:
    import torch.multiprocessing as mp

    out.mkdir()
    mp.spawn(cli_rank, args=(2, free_port(), ["--no-ray", *TINY, *argv], str(out)), nprocs=2)
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.heavy
def test_a_notice_in_the_middle_of_a_step_commits_that_step_and_the_run_resumes_exactly(dataset, tmp_path):
    """Rank 1 gets SIGTERM after its first backward of step 3: both ranks agree at step 3, commit it and stop as
    preempted (a notice read only at the next step would save step 4); the rerun continues from step 3 with the
    losses of a run never interrupted."""
    from trainer.__main__ import main

    reference = tmp_path / "reference"
    code, _, err = run_captured(main, ["--no-ray", *TINY, "--data.path", dataset, "--run.dir", reference, *STEPS])
    assert code == 0 and "cannot cover" not in err, err[-3000:]

    run = str(tmp_path / "run")
    ranks = two_ranks(["--data.path", dataset, "--run.dir", run, *STEPS, "--fault.sigterm_at_step=3",
                       "--fault.rank=1"], tmp_path / "ranks")
    for rank in ranks:
        last = rank["err"].strip().splitlines()[-1]
        assert rank["code"] == 2 and last == "error: preempted: stopped at step 3 with its checkpoint committed", \
            rank["err"][-3000:]
    assert "fault injection: rank 1 sends itself SIGTERM in step 3" in ranks[1]["err"]
    assert re.search(r"preemption notice: checkpoint at step 3 committed [\d.]+s after it \(grace 25s\)",
                     ranks[1]["err"]), ranks[1]["err"][-3000:]
    assert [(step, ok) for step, _, ok in list_checkpoints(run)] == [(3, True)]
    assert [m["step"] for m in metrics(run) if "loss" in m] == [1, 2, 3] and "checkpoint_save_s" in metrics(run)[-1]

    code, _, err = run_captured(main, ["--no-ray", *TINY, "--data.path", dataset, "--run.dir", run, *STEPS])
    assert code == 0, err[-3000:]
    assert "at step 3 (saved by 2 workers, now 1)" in err and "cannot cover" not in err, err[-3000:]
    assert [m["step"] for m in metrics(run) if "loss" in m] == list(range(1, 7))
    assert within(losses(run), losses(str(reference)))


@pytest.mark.heavy
def test_a_grace_shorter_than_a_step_and_a_save_is_one_warning_with_the_figures(dataset, tmp_path):
    """A fresh run warns once a save has committed, from its second log window on (the first one's warm-up is no
    step time), with that log line's step time and the newest save's seconds; the resumed run warns before its
    first step, from what metrics.jsonl recorded, and only once."""
    from trainer.__main__ import main

    run = tmp_path / "run"
    common = ["--no-ray", *TINY, "--data.path", dataset, "--run.dir", run, "--train.log_every=2",
              "--train.eval_every=0", "--checkpoint.every=2", "--checkpoint.preempt_grace_s=0.001"]
    code, _, err = run_captured(main, [*common, "--train.steps=6"])
    assert code == 0, err[-3000:]
    warnings = WARNING.findall(err)
    assert len(warnings) == 1 and err.count("cannot cover") == 1, err[-3000:]
    step_s, save_s, total, by = warnings[0]
    lines = [m for m in metrics(str(run)) if "loss" in m]
    line = lines[1]  # step 4: the save of step 2 is committed by then (the save of step 4 waits for it)
    newest_save = [m["checkpoint_save_s"] for m in lines[:2] if "checkpoint_save_s" in m][-1]
    assert (step_s, save_s, by) == (f"{line['step_time_s']:.2f}", f"{newest_save:.2f}", "this run")
    assert float(total) == pytest.approx(line["step_time_s"] + newest_save, abs=0.006)

    code, _, err = run_captured(main, [*common, "--train.steps=8"])
    assert code == 0 and "resumed from" in err, err[-3000:]
    warnings = WARNING.findall(err)
    assert len(warnings) == 1 and err.count("cannot cover") == 1, err[-3000:]
    recorded = [m for m in metrics(str(run)) if m["step"] <= 6]
    last_save = next(m["checkpoint_save_s"] for m in reversed(recorded) if "checkpoint_save_s" in m)
    assert warnings[0][:2] == (f"{recorded[-1]['step_time_s']:.2f}", f"{last_save:.2f}")
    assert warnings[0][3] == f"the previous run in {run}"
