"""python -m trainer.rl: reinforcement learning from verifiable rewards (GRPO) on Ray.

    python -m trainer.rl --config configs/grpo-demo.toml --rl.policy=SFT_RUN --rl.prompts=PROMPTS.jsonl \\
        --run.dir RUN_DIR [--rl.reward numeric | module:function] [--section.field=value ...]

Rollout actors (rl.rollout_workers, each a full copy of the policy) sample rl.group_size replies to each of a
step's prompts, reward tasks score them, the FSDP2 trainer group (ray.num_workers) makes the GRPO update, and the
new weights go back to the actors. The same command continues a stopped run from its newest checkpoint.
"""

from __future__ import annotations

import sys

from raylm import storage
from raylm.cli import configure_logging, parse_job_args, run_cli
from raylm.errors import ConfigError
from raylm.tokenizer import load_tokenizer
from trainer import checkpoint
from trainer.eval.job import find_checkpoint
from trainer.rl.config import RLJob, check_required, job_paths, make_paths_absolute
from trainer.rl.prompts import read_prompts
from trainer.rl.rewards import load_reward


def check_before_launch(job: RLJob) -> int:
    """User mistakes caught on the driver before any worker starts: the policy readable and with a chat template,
    every prompt line usable with room for rl.max_new_tokens, the reward function importable, the workers within
    the step's samples. Returns the step of RUN_DIR's newest checkpoint (0 when it has none)."""
    check_required(job)
    for path in job_paths(job).values():
        if path:
            storage.check_bucket(path)
    found = find_checkpoint(job.rl.policy)
    if job.rl.max_new_tokens >= found.cfg.max_seq_len:
        raise ConfigError(f"rl.max_new_tokens={job.rl.max_new_tokens} leaves no room for a prompt in the policy's "
                          f"context of {found.cfg.max_seq_len} tokens; lower it")
    tokenizer = load_tokenizer(found.tokenizer, where=job.rl.policy)
    room = found.cfg.max_seq_len - job.rl.max_new_tokens
    for path in (job.rl.prompts, job.rl.eval_prompts):
        if path:
            read_prompts(path, tokenizer, max_prompt_len=room)
    load_reward(job.rl.reward)
    newest = checkpoint.latest_committed(job.run.dir, quiet=True)
    return checkpoint.read_train_state(newest)["step"] if newest else 0


def main(argv: list[str]) -> int:
    job, _ = parse_job_args(argv, prog="python -m trainer.rl", description=__doc__, root=RLJob)
    configure_logging("trainer")
    make_paths_absolute(job)
    start = check_before_launch(job)
    if start >= job.rl.steps:
        print(f"{job.run.dir} already finished: its newest checkpoint is at step {start} and rl.steps="
              f"{job.rl.steps}; raise --rl.steps to train on, or use a new --run.dir")
        return 0
    from trainer.ray_launch import launch_rl

    try:
        history = launch_rl(job).return_value["history"]
    except KeyboardInterrupt:
        raise KeyboardInterrupt("run the same command again to continue from the newest checkpoint") from None
    print_summary(job, history)
    return 0


def print_summary(job: RLJob, history: list[dict]) -> None:
    evals = [m for m in history if "val/accuracy" in m]
    if evals:
        print("held-out accuracy (greedy): " + " -> ".join(f"{m['val/accuracy']:.0%} (step {m['step']})"
                                                           for m in evals))
    steps = [m for m in history if "rollout_s" in m]
    if steps:
        split = {k: sum(m[k] for m in steps) for k in ("rollout_s", "reward_s", "update_s", "sync_s")}
        total = sum(m["step_time_s"] for m in steps)
        print(f"time of the {len(steps)} logged steps: {total:.1f} s: " + ", ".join(
            f"{k[:-2]} {v / total:.0%}" for k, v in split.items()))
    print(f"finished; config, metrics.jsonl and checkpoints in {job.run.dir}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
