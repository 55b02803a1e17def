"""Preference tuning end to end: a DPO run is exact on any world size and after a kill, its reference log-probs are
scored once (resumable, reused, refused when of other weights or data), and it aligns a model to the preferred
replies (held-out exact match through the export in transformers)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import losses, metrics, preference_task, run_captured, trainer_cli, within

DPO = ["--train.objective=dpo", "--train.log_every=1", "--train.global_batch=16", "--train.micro_batch=4"]


def train(data: str, run_dir, *args) -> tuple[int, str, str]:
    from helpers import TINY
    from trainer.__main__ import main

    return run_captured(main, ["--no-ray", *TINY, *DPO, "--data.path", data, "--run.dir", run_dir, *args])


def parts(where) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(where.glob("*.npy"))}


def test_the_reference_pass_is_reused_resumed_and_refused_for_other_weights_or_data(pairs_data, tmp_path):
    """`python -m trainer.reference` scores every row once; the run then reads the parts as they are, as does a run
    elsewhere pointed at them; a pass cut short (a part missing) scores only the missing part, to the same bytes; a
    reference of other initial weights or another dataset, DPO on data without pairs and pairs trained as text are
    refused in one line before compute."""
    from helpers import TINY
    from trainer.reference import main as reference

    where = tmp_path / "a" / "reference"
    code, out, err = run_captured(reference, ["--no-ray", *TINY, *DPO, "--data.path", pairs_data["pref"], "--run.dir",
                                              tmp_path / "a"])
    assert code == 0, err
    first = parts(where)
    assert sorted(first) == ["train-00000.npy", "train-00001.npy", "val-00000.npy"]
    rows = sum(len(np.load(where / name)) for name in first)
    assert " rows scored" in err and f"reference log-probs of every train and val row in {where} ({rows:,} rows " \
                                      "scored by this pass in " in out
    assert not (tmp_path / "a" / "checkpoints").exists()

    for run in ("a", "b"):
        code, _, err = train(pairs_data["pref"], tmp_path / run, "--train.steps=2", f"--dpo.reference={where}")
        assert code == 0, err
        assert f"reference log-probs: reusing {where}" in err and " rows scored" not in err and parts(where) == first
        assert metrics(str(tmp_path / run))[0]["reference_rows"] == 0  # the run's record of its pass: none

    (where / "train-00001.npy").unlink()
    code, _, err = train(pairs_data["pref"], tmp_path / "c", "--train.steps=2", f"--dpo.reference={where}")
    assert code == 0, err
    assert " rows scored" in err and "(1 parts)" in err and parts(where) == first
    assert metrics(str(tmp_path / "c"))[0]["reference_rows"] == len(np.load(where / "train-00001.npy"))
    assert "reference_rows" not in metrics(str(tmp_path / "c"))[1]
    assert within(losses(str(tmp_path / "c")), losses(str(tmp_path / "a")))

    refused = {
        "weights": (pairs_data["pref"], ["--train.seed=1", f"--dpo.reference={where}"],
                    f"error: {where} holds reference log-probs of other weights"),
        "dataset": (pairs_data["other"], [f"--dpo.reference={where}"],
                    f"error: {where} holds reference log-probs of other dataset"),
        "no pairs": (pairs_data["text"], [], "--train.objective=dpo needs preference pairs"),
        "pairs as text": (pairs_data["pref"], ["--train.objective=lm"], "holds preference pairs; train on it with "
                                                                         "--train.objective=dpo"),
    }
    for name, (data, args, line) in refused.items():
        code, out, err = train(data, tmp_path / name, "--train.steps=2", *args)
        assert code != 0 and line in err and "Traceback" not in err, (name, err)
        assert not (tmp_path / name).exists(), name  # refused before the run made anything


@pytest.mark.heavy
def test_a_dpo_run_is_the_same_on_any_world_size_and_after_a_kill(local_ray, pairs_data, tmp_path):
    """W=1 and W=3 (shares of 6, 5, 5 rows: pairs split unevenly, empty micro-batches) log the same per-step DPO
    losses and score the same reference log-probs; step 1 (policy = reference) logs ln 2 and zero rewards; under
    Ray Train on 2 workers, a worker killed after step 5 restarts the group, which continues with the uninterrupted
    losses, reading the reference its first start scored (no part written after the kill)."""
    from helpers import TINY
    from trainer.__main__ import main

    common = ["--data.path", pairs_data["pref"], "--train.steps=8", "--train.eval_every=4", "--checkpoint.every=4",
              *DPO]
    one = trainer_cli(*common, "--run.dir", str(tmp_path / "w1"))
    assert one.returncode == 0, one.stderr[-3000:]
    three = trainer_cli(*common, "--run.dir", str(tmp_path / "w3"), torchrun=3)
    assert three.returncode == 0, three.stderr[-3000:]
    reference = losses(str(tmp_path / "w1"))
    assert len(reference) == 8 and reference[-1] < reference[0]
    assert within(losses(str(tmp_path / "w3")), reference)
    first = metrics(str(tmp_path / "w1"))[1]
    assert first["step"] == 1 and abs(first["loss"] - math.log(2)) < 1e-5
    assert all(abs(first[k]) < 1e-5 for k in ("rewards/chosen", "rewards/rejected", "rewards/margin"))
    w1, w3 = parts(tmp_path / "w1" / "reference"), parts(tmp_path / "w3" / "reference")
    assert list(w1) == list(w3) and all(np.allclose(np.load(tmp_path / "w1" / "reference" / name),
                                                    np.load(tmp_path / "w3" / "reference" / name), rtol=0, atol=1e-5)
                                        for name in w1)

    killed = tmp_path / "killed"
    code, _, err = run_captured(main, [*TINY, *common, "--run.dir", killed, "--fault.kill_at_step=5",
                                       "--ray.num_workers=2"])
    assert code == 0, err
    killed_at = (killed / "fault-injected-step-000005").stat().st_mtime_ns
    assert all(p.stat().st_mtime_ns < killed_at for p in (killed / "reference").glob("*.npy"))  # no second pass
    assert [m["step"] for m in metrics(str(killed)) if "loss" in m] == list(range(1, 9))
    assert within(losses(str(killed)), reference)


def exact_match(generate, held_out: list[tuple[str, str]]) -> float:
    return sum(generate(question) == answer for question, answer in held_out) / len(held_out)


@pytest.mark.heavy
def test_dpo_aligns_a_model_to_the_preferred_replies(tmp_path, capsys):
    """A model instruction-tuned on replies that are right half the time answers held-out prompts right about half
    the time; DPO on pairs (right chosen, wrong rejected) brings held-out reward accuracy to >= 90 % and raises
    exact match, greedy through the export in transformers, by >= 20 points."""
    transformers = pytest.importorskip("transformers")
    from dataprep.__main__ import main as dataprep
    from trainer.__main__ import main as trainer
    from trainer.export import main as export

    held_out = preference_task(tmp_path)
    local = "--workers.local=true"
    for argv in (["--input", tmp_path / "corpus", "--output", tmp_path / "text", "--vocab-size", "320",
                  "--seq-len", "64", local],
                 ["--format", "chat", "--input", tmp_path / "chat", "--tokenizer", tmp_path / "text", "--output",
                  tmp_path / "chatdata", "--seq-len", "128", "--val-fraction", "0.05", local],
                 ["--format", "preference", "--input", tmp_path / "pairs", "--tokenizer", tmp_path / "text",
                  "--output", tmp_path / "prefdata", "--seq-len", "128", "--val-fraction", "0.1", local]):
        code, _, err = run_captured(dataprep, argv)
        assert code == 0, err
    model = ["--config", "configs/tiny.toml", "--train.global_batch=16", "--train.micro_batch=16",
             "--train.sample_prompt=", "--checkpoint.every=0", "--optim.warmup_steps=5"]
    code, _, err = run_captured(trainer, ["--no-ray", *model, "--train.steps=400", "--optim.lr=5e-3",
                                          "--train.log_every=100", "--train.eval_every=0", "--data.path",
                                          tmp_path / "chatdata", "--run.dir", tmp_path / "sft"])
    assert code == 0, err
    code, _, err = run_captured(trainer, ["--no-ray", *model, "--train.objective=dpo", "--dpo.beta=0.5",
                                          "--dpo.sft_weight=1", "--train.steps=80", "--optim.lr=3e-3",
                                          "--train.log_every=20", "--train.eval_every=40", "--data.path",
                                          tmp_path / "prefdata", "--run.dir", tmp_path / "dpo",
                                          f"--checkpoint.resume_from={tmp_path / 'sft'}",
                                          "--checkpoint.load_weights_only=true"])
    assert code == 0, err
    accuracy = [m["val_rewards/accuracy"] for m in metrics(str(tmp_path / "dpo")) if "val_rewards/accuracy" in m]

    match = {}
    for run in ("sft", "dpo"):
        assert run_captured(export, ["--checkpoint", tmp_path / run, "--out", tmp_path / f"hf-{run}"])[0] == 0
        tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / f"hf-{run}")
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"hf-{run}")

        def greedy(question: str) -> str:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
            out = hf_model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):]
            return tokenizer.decode(out, skip_special_tokens=True)

        match[run] = exact_match(greedy, held_out)
    with capsys.disabled():
        print(f"\npreference task, {len(held_out)} held-out prompts: exact match {match['sft']:.0%} instruction-tuned "
              f"-> {match['dpo']:.0%} after DPO; held-out reward accuracy {accuracy[-1]:.0%}")
    assert match["sft"] <= 0.7 and accuracy[-1] >= 0.9 and match["dpo"] - match["sft"] >= 0.2
