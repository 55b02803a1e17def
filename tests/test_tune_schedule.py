"""A Tune study's trials on schedules of the same shape: every batch size at the same lr at the same token count, and
a warmup too long for the shortest trial refused before any compute; a DPO trial's β and divergence, a mix search's
weights (fast tier: no Ray)."""

from __future__ import annotations

import pytest

from helpers import run_captured
from raylm.config import load_config
from trainer.optim import lr_factor
from tune.config import TuneJobConfig
from tune.study import study_spec, trial_job, warmup_fraction

SEQ_LEN = 64
STUDY = ["--tune.batch=8,16", "--tune.budget_tokens=20480"]
"""4 marks of 5,120 tokens: 40 steps at batch 8, 20 at batch 16."""


def trial_jobs(*args: str, warmup_steps: int | None = None) -> dict:
    """{batch: the trial's training job} of a study of the tiny preset at lr 3e-3, as its trials get them."""
    job = load_config(TuneJobConfig, "configs/tiny.toml", [*STUDY, *args])
    job.tune.warmup_fraction = warmup_fraction(job.tune, SEQ_LEN, warmup_steps)
    study = study_spec(job, seq_len=SEQ_LEN, vocab_size=1000, tasks=None)
    return {batch: trial_job({"lr": 3e-3, "batch": batch}, study, f"/tmp/trial-{batch}") for batch in job.tune.batch}


def lr_at(job, share: float) -> float:
    """The lr of the update that ends at `share` of the trial's tokens."""
    step = round(share * job.train.steps) - 1
    return job.optim.lr * lr_factor(step, optim=job.optim, total_steps=job.train.steps)


@pytest.mark.parametrize("args, warmup_steps", [([], None), (["--optim.schedule=wsd"], None), ([], 5)])
def test_two_batch_sizes_reach_the_same_lr_at_the_same_token_mark(args, warmup_steps):
    """The default preset keeps optim.warmup_steps=100 for its full run; a trial is 20 or 40 steps."""
    jobs = trial_jobs(*args, warmup_steps=warmup_steps)
    short, long = jobs[16], jobs[8]
    assert long.train.steps == 2 * short.train.steps == 40  # equal tokens
    shares = [k / short.train.steps for k in range(1, short.train.steps + 1)]  # every step end of both trials
    assert [lr_at(long, s) for s in shares] == pytest.approx([lr_at(short, s) for s in shares], rel=1e-12)
    assert max(lr_at(short, s) for s in shares) == pytest.approx(3e-3)  # warmed up: the sampled lr is reached
    assert lr_at(short, 1.0) == pytest.approx(3e-3 * short.optim.min_lr_ratio)  # the decay spans the trial
    if warmup_steps:  # given on the command line: the shortest trial's, the same tokens in the other
        assert (short.optim.warmup_steps, long.optim.warmup_steps) == (5, 10)


def test_a_dpo_trial_takes_its_beta_and_diverges_only_on_a_non_finite_loss():
    """The DPO loss's scale grows with β (a LM loss is at most ~ln V for a uniform guess), so a DPO trial is not cut at
    tune.diverge_factor × ln V; its β is the trial's, and trials without one keep the job's."""
    job = load_config(TuneJobConfig, "configs/tiny.toml", [*STUDY, "--train.objective=dpo", "--dpo.beta=0.3",
                                                          "--tune.lr=1e-3,3e-3", "--tune.beta=0.1,1"])
    study = study_spec(job, seq_len=SEQ_LEN, vocab_size=1000, tasks=None)
    dpo = trial_job({"lr": 1e-3, "batch": 8, "beta": 1.0}, study, "/tmp/trial")
    assert (dpo.dpo.beta, dpo.optim.lr, dpo.train.max_loss) == (1.0, 1e-3, float("inf"))
    assert trial_job({"lr": 1e-3, "batch": 8}, study, "/tmp/trial").dpo.beta == 0.3
    lm = load_config(TuneJobConfig, "configs/tiny.toml", STUDY)
    assert trial_job({"lr": 1e-3, "batch": 8}, study_spec(lm, seq_len=SEQ_LEN, vocab_size=1000, tasks=None),
                     "/tmp/trial").train.max_loss == pytest.approx(1.5 * 6.9078, rel=1e-4)


def test_a_trial_of_a_mix_search_trains_on_its_weight_beside_the_others():
    job = load_config(TuneJobConfig, "configs/tiny.toml", [*STUDY, "--data.mix=web=0.6,code=0.4",
                                                          "--tune.lr=3e-3", "--tune.mix=math=0.1,0.3"])
    assert [(e.key, e.column, e.values) for e in job.tune.extras] == [("mix", "math_weight", [0.1, 0.3])]
    trial = trial_job({"lr": 3e-3, "batch": 8, "mix": 0.3}, study_spec(job, seq_len=SEQ_LEN, vocab_size=1000,
                                                                       tasks=None), "/tmp/trial")
    assert trial.data.mix == {"web": 0.6, "code": 0.4, "math": 0.3} and job.data.mix == {"web": 0.6, "code": 0.4}


@pytest.mark.parametrize("args, expected", [
    (["--tune.mix=math=0.1:0.3"], "searches one weight of data.mix: set --data.mix with the other sources' weights"),
    (["--data.mix=web=1", "--tune.mix=0.1:0.3"], "tune.mix='0.1:0.3' must be NAME=LOW:HIGH or NAME=a,b,c"),
    (["--data.mix=web=1", "--tune.lr=1e-3,3e-3", "--tune.mix=math=0.1:0.3"], "tune.mix=math=0.1:0.3 must take "
                                                                             "tune.lr's form (1e-3,3e-3)"),
])
def test_a_bad_mix_search_is_refused(args, expected):
    from raylm.errors import ConfigError

    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_config(TuneJobConfig, "configs/tiny.toml", [*STUDY, *args])


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> str:
    """40 stdlib files tokenized in this process (--workers.local): 1000-token vocabulary, 64-token rows."""
    from dataprep.__main__ import main

    out = tmp_path_factory.mktemp("datasets") / "stdlib"
    code, _, err = run_captured(main, ["--max-files", "40", "--vocab-size", "1000", "--seq-len", "64",
                                       "--val-fraction", "0.05", "--workers.local=true", "--output", out])
    assert code == 0, err
    return str(out)


@pytest.mark.parametrize("args, expected", [
    (["--optim.warmup_steps=11"], "--optim.warmup_steps=11 is more than half of the shortest trial (20 steps at "
                                  "global batch 16)"),
    (["--optim.warmup_steps=5", "--tune.warmup_fraction=0.1"], "both set the trials' warmup: give one"),
])
def test_a_warmup_too_long_for_the_shortest_trial_is_refused_before_compute(small_dataset, tmp_path, monkeypatch,
                                                                              args, expected):
    import tune.study
    from tune.__main__ import main

    def no_compute(**kwargs):
        raise AssertionError("Ray started for a study that should have been refused")

    monkeypatch.setattr(tune.study, "init_ray", no_compute)
    code, _, err = run_captured(main, ["--config", "configs/tiny.toml", *STUDY, "--data.path", small_dataset,
                                       "--tune.dir", tmp_path / "study", *args])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert not (tmp_path / "study").exists()
