"""RL from verifiable rewards (`python -m trainer.rl`): a model instruction-tuned on a checkable task learns it
from rewards alone; rollouts, losses and resumes are exact; faulty rewards and lost rollout actors never stop a
run."""

from __future__ import annotations

import json
import random

import pytest

from helpers import INSTRUCTION_WORDS, metrics, run_captured, within

REWARD_FILE = '''
import time


def reward(reply, answer, example):
    """exact match, but the checker raises on one reply, hangs on another and returns text for a third"""
    if reply == "apple":
        raise ValueError("a checker that fails")
    if reply == "tiger":
        time.sleep(30)
    if reply == "ocean":
        return "not a number"
    return float(reply == answer)
'''


def word_task(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(INSTRUCTION_WORDS, rng.randint(2, 5))
    kind = rng.choice(["first", "last"])
    return f"{kind} word of: {' '.join(words)}", words[0] if kind == "first" else words[-1]


def write_jsonl(path, records: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def sft_policy(tmp_path_factory) -> dict[str, str]:
    """A tiny model instruction-tuned on the first or last word of a list, made in-process without Ray. Its replies
    are always the right word, but 60 % of them in a chatty form ("the first word is apple") that an exact-match
    checker does not accept: a tuned model answers a held-out prompt acceptably a small part of the time. RL
    prompts and held-out prompts (none in the tuning data) of the same task come with it."""
    from dataprep.__main__ import main as dataprep
    from trainer.__main__ import main as trainer

    root = tmp_path_factory.mktemp("rl")
    rng = random.Random(0)
    held: dict[str, str] = {}
    while len(held) < 60:
        held.setdefault(*word_task(rng))
    chat, prompts = [], []
    while len(chat) < 2000 or len(prompts) < 3000:
        prompt, answer = word_task(rng)
        if prompt in held:
            continue
        if len(chat) < 2000:
            chat.append({"prompt": prompt, "response": answer if rng.random() < 0.4 else
                         f"the {prompt.split()[0]} word is {answer}"})
        else:
            prompts.append({"prompt": prompt, "answer": answer})
    text = [" ".join(rng.choice(INSTRUCTION_WORDS + "first last word of the is".split())
                     for _ in range(rng.randint(5, 15))) + "." for _ in range(2000)]
    write_jsonl(root / "corpus" / "text.jsonl", [{"text": t} for t in text])
    write_jsonl(root / "chat" / "chat.jsonl", chat)
    local = "--workers.local=true"
    for argv in (["--input", root / "corpus", "--output", root / "text", "--vocab-size", "320", "--seq-len", "64",
                  local],
                 ["--format", "chat", "--input", root / "chat", "--tokenizer", root / "text", "--output",
                  root / "chatdata", "--seq-len", "128", "--val-fraction", "0.05", local]):
        code, _, err = run_captured(dataprep, argv)
        assert code == 0, err
    code, _, err = run_captured(trainer, [
        "--no-ray", "--config", "configs/tiny.toml", "--train.global_batch=16", "--train.micro_batch=16",
        "--train.sample_prompt=", "--checkpoint.every=0", "--optim.warmup_steps=5", "--train.steps=400",
        "--optim.lr=5e-3", "--train.log_every=100", "--train.eval_every=0", "--data.path", root / "chatdata",
        "--run.dir", root / "sft"])
    assert code == 0, err
    (root / "rewards.py").write_text(REWARD_FILE)
    return {"sft": str(root / "sft"), "root": str(root), "reward": f"{root / 'rewards.py'}:reward",
            "prompts": write_jsonl(root / "prompts.jsonl", prompts),
            "held": write_jsonl(root / "held.jsonl", [{"prompt": q, "answer": a} for q, a in held.items()])}


def rl_args(policy: dict, run_dir, *args) -> list[str]:
    return ["--config", "configs/grpo-demo.toml", "--rl.policy", policy["sft"], "--rl.prompts", policy["prompts"],
            "--run.dir", str(run_dir), *args]


def rl(policy: dict, run_dir, *args) -> list[dict]:
    from trainer.rl.__main__ import main

    code, out, err = run_captured(main, rl_args(policy, run_dir, *args))
    assert code == 0, err
    return [m for m in metrics(str(run_dir)) if "loss" in m]


def test_grpo_teaches_a_tuned_model_what_the_checker_accepts(local_ray, sft_policy, tmp_path, capsys):
    """Acceptance: GRPO with the exact-match reward raises held-out accuracy (greedy, answered by the rollout
    actors) by >= 15 points over the instruction-tuned model within a minute of CPU training."""
    history = rl(sft_policy, tmp_path / "grpo", "--rl.eval_prompts", sft_policy["held"])  # the preset: 20 steps
    evals = [m for m in metrics(str(tmp_path / "grpo")) if "val/accuracy" in m]
    before, after = evals[0]["val/accuracy"], evals[-1]["val/accuracy"]
    split = {k: sum(m[k] for m in history) for k in ("rollout_s", "reward_s", "update_s", "sync_s", "step_time_s")}
    with capsys.disabled():
        print(f"\nGRPO, 60 held-out prompts: exact match {before:.0%} instruction-tuned -> {after:.0%} after "
              f"{len(history)} steps; {split['step_time_s']:.1f} s of steps: " + ", ".join(
                  f"{k[:-2]} {v:.1f} s" for k, v in split.items() if k != "step_time_s"))
    assert evals[0]["step"] == 0 and after - before >= 0.15
    assert all(m["kl"] >= 0 for m in history) and history[-1]["kl"] > 0


def test_rollouts_and_losses_are_the_same_on_any_actor_count_world_size_and_after_faults(local_ray, sft_policy,
                                                                                       tmp_path):
    """Acceptance: 1 rollout actor vs 2 give identical rollouts and losses; W=1 vs W=2 losses within 1e-5; a
    rollout actor killed mid-step and a trainer rank killed after step 3 change nothing; a reward that raises,
    hangs past its deadline or returns text scores 0, is counted, and the run goes on."""
    common = ["--rl.steps=4", "--rl.prompts_per_step=8", "--rl.reward", sft_policy["reward"],
              "--rl.reward_timeout_s=0.5", "--checkpoint.every=1", "--checkpoint.async_save=false"]
    one = rl(sft_policy, tmp_path / "one", *common, "--ray.num_workers=1", "--rl.rollout_workers=1")
    two = rl(sft_policy, tmp_path / "two", *common, "--ray.num_workers=1", "--rl.rollout_workers=2")
    faults = rl(sft_policy, tmp_path / "faults", *common, "--ray.num_workers=2", "--rl.rollout_workers=2",
                "--fault.rollout_kill_at_step=2", "--fault.kill_at_step=3", "--ray.max_failures=1")
    rollout = ("reward_mean", "accuracy", "reply_len", "truncated", "reward_errors", "reward_timeouts",
               "reward_invalid")
    assert [m["step"] for m in one] == [m["step"] for m in faults] == [1, 2, 3, 4]
    for a, b, c in zip(one, two, faults):
        assert {k: a[k] for k in (*rollout, "loss", "kl")} == {k: b[k] for k in (*rollout, "loss", "kl")}
        assert {k: a[k] for k in rollout} == {k: c[k] for k in rollout}
    assert within([m["loss"] for m in one], [m["loss"] for m in faults])
    assert faults[1]["rollout_restarts"] >= 1 and one[1]["rollout_restarts"] == 0
    assert (tmp_path / "faults" / "fault-injected-step-000003").exists()
    for key in ("reward_errors", "reward_timeouts", "reward_invalid"):
        assert sum(m[key] for m in one) > 0, key


@pytest.mark.heavy
@pytest.mark.parametrize("args, message", [
    ((), "rl.policy is not set"),
    (("--rl.policy", "{root}/nowhere"), "is neither a raylm run or step directory nor a Hugging Face folder"),
    (("--rl.prompts", "{root}/bad.jsonl"), "bad.jsonl line 2 has no \"prompt\""),
    (("--rl.prompts", "{root}/long.jsonl"), "long.jsonl line 1: the prompt is"),
    (("--rl.reward", "no_such_module:reward"), "rl.reward=no_such_module:reward: no_such_module cannot be imported"),
    (("--rl.reward", "{root}/rewards.py:missing"), "has no function missing"),
    (("--rl.max_new_tokens=4096",), "rl.max_new_tokens=4096 leaves no room for a prompt"),
    (("--rl.advantage=ppo",), "rl.advantage must be one of grpo, drgrpo"),
])
def test_bad_rl_input_is_one_line_before_any_compute(sft_policy, tmp_path, args, message):
    from trainer.rl.__main__ import main

    root = sft_policy["root"]
    write_jsonl(tmp_path / "unused.jsonl", [])
    (tmp_path.parent / "bad.jsonl").write_text('{"prompt": "first word of: a b", "answer": "a"}\n{"answer": "b"}\n')
    write_jsonl(tmp_path.parent / "long.jsonl", [{"prompt": "first word of: " + " ".join(INSTRUCTION_WORDS * 200),
                                                  "answer": "apple"}])
    given = [a.format(root=tmp_path.parent if a.endswith(("bad.jsonl", "long.jsonl")) else root) for a in args]
    base = [] if not args else ["--rl.policy", sft_policy["sft"], "--rl.prompts", sft_policy["prompts"]]
    code, out, err = run_captured(main, ["--config", "configs/grpo-demo.toml", *base, *given, "--run.dir",
                                         str(tmp_path / "run")])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
