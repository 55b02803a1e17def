"""The checks of benchmarks/gpu.sh that are a verdict rather than a throughput figure: one stdout line each,
`CHECK  SUBJECT  PASS|FAIL|SKIP  details`; exit 0 on PASS or SKIP, 1 on FAIL.

    python -m benchmarks.gpu_checks flex [--device cuda|cpu]
    python -m benchmarks.gpu_checks sample LOG --subject "125m torchrun"
    python -m benchmarks.gpu_checks eval --results R.json --log LOG --subject "125m torchrun" -- COMMAND ...
    python -m benchmarks.gpu_checks preempt --run-dir RUN --log LOG --after-step N --subject S -- COMMAND ...

flex: 4 examples of different lengths packed in one row with `segments` through FlexAttention (the model's
`attention="flex"`; on CUDA in bf16 with every block compiled, as the trainer runs it) give each example the logits
and the parameter gradients of running it alone through SDPA's causal kernel, within the dtype's tolerance. On CPU
FlexAttention has no backward: the forward alone is compared, in fp32.
sample: the run's log holds the trainer's end-of-run sample.
eval: COMMAND (python -m trainer.eval … --out R.json) exits 0 and R.json has a finite bits-per-byte.
preempt: COMMAND (a torchrun training run) gets SIGTERM on its training rank once metrics.jsonl has step N; the
trainer must log "preemption notice: checkpoint at step S committed X s after it (grace Y s)" with X <= Y and that
checkpoint committed; COMMAND run again must resume from step S and finish.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import traceback

NOTICE = re.compile(r"preemption notice: checkpoint at step (\d+) committed ([\d.]+)s after it \(grace (\d+)s\)")
RESUMED = re.compile(r"resumed from \S+ at step (\d+)")
TOLERANCE = {"torch.bfloat16": 5e-2, "torch.float32": 1e-4}
"""Largest relative error (max |packed - alone| / max |alone| for logits, ‖packed - alone‖ / ‖alone‖ for a
parameter's gradient) taken for equal: bf16 keeps 8 bits of mantissa (2^-8 ≈ 4e-3 per rounding)."""
LENGTHS = {"cuda": (300, 129, 411, 184), "cpu": (13, 22, 9, 20)}
"""Example lengths packed in one row: unequal, and on CUDA crossing FlexAttention's 128-token blocks."""


def verdict(check: str, subject: str, ok: bool | None, detail: str) -> int:
    """Print the check's line; its exit status (None: skipped)."""
    word = "SKIP" if ok is None else "PASS" if ok else "FAIL"
    print(f"{check:<8} {subject:<16} {word}  {detail}", flush=True)
    return 0 if ok is not False else 1


# flex -------------------------------------------------------------------------------------------------------------

def small_model(device, dtype, *, seq_len: int):
    """(FlexAttention model, the same weights for the examples alone): GQA, a few blocks; compiled on CUDA."""
    import torch

    from trainer.model.config import ModelConfig
    from trainer.model.transformer import Transformer

    cuda = device.type == "cuda"
    cfg = ModelConfig(vocab_size=512, dim=256 if cuda else 64, n_layers=4 if cuda else 2, n_heads=4, n_kv_heads=2,
                      max_seq_len=seq_len, attention="flex")
    with torch.device(device):
        model = Transformer(cfg)
    model.init_weights()
    model.to(dtype)
    alone = copy.deepcopy(model)  # eager: each example's own length would recompile a compiled copy
    if cuda:
        for block in model.layers:
            block.compile()  # as parallel.compile=true does
    return model, alone


def example_loss(logits, tokens):
    """Summed next-token cross-entropy of one example's logits (L, V) and tokens (L,)."""
    import torch.nn.functional as F

    return F.cross_entropy(logits[:-1].float(), tokens[1:], reduction="sum")


def packed_vs_alone(model, alone, examples: list, *, backward: bool) -> tuple[float, float | None]:
    """(logits error, gradient error or None) of the examples packed in one row vs each run alone; see TOLERANCE."""
    import torch

    lengths = [len(e) for e in examples]
    tokens = torch.cat(examples)[None]  # (1, T)
    segments = torch.repeat_interleave(torch.arange(len(examples), device=tokens.device),
                                       torch.tensor(lengths, device=tokens.device))[None]  # (1, T)
    with torch.set_grad_enabled(backward):
        packed = model(tokens, segments=segments)[0][0].split(lengths)  # each (L, V)
        singles = [alone(e[None])[0][0] for e in examples]
    logits_err = max((p - s).abs().max().item() / s.abs().max().item() for p, s in zip(packed, singles))
    if not backward:
        return logits_err, None
    total = sum(lengths) - len(lengths)
    params = list(model.parameters())
    grads = torch.autograd.grad(sum(example_loss(p, e) for p, e in zip(packed, examples)) / total, params)
    reference = [torch.zeros_like(p, dtype=torch.float32) for p in alone.parameters()]
    for logits, e in zip(singles, examples):  # one example at a time, summed in fp32
        for r, g in zip(reference, torch.autograd.grad(example_loss(logits, e) / total, list(alone.parameters()))):
            r += g.float()
    grad_err = max(((g.float() - r).norm() / r.norm()).item() for g, r in zip(grads, reference) if r.norm() > 0)
    return logits_err, grad_err


def flex_check(device_name: str) -> int:
    import torch

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    lengths = LENGTHS[device.type]
    model, alone = small_model(device, dtype, seq_len=sum(lengths))
    generator = torch.Generator(device=device).manual_seed(0)
    examples = [torch.randint(model.cfg.vocab_size, (n,), generator=generator, device=device) for n in lengths]
    t0 = time.perf_counter()
    logits_err, grad_err = packed_vs_alone(model, alone, examples, backward=cuda)
    tol = TOLERANCE[str(dtype)]
    what = f"{len(lengths)} examples ({', '.join(map(str, lengths))} tokens) in one row, {str(dtype)[6:]}: "
    what += f"logits max rel err {logits_err:.1e}"
    ok = logits_err <= tol
    if grad_err is None:
        what += "; forward only (FlexAttention has no backward on CPU)"
    else:
        what += f", grads max rel err {grad_err:.1e}"
        ok = ok and grad_err <= tol
    return verdict("flex", "packed vs alone", ok, f"{what} (tol {tol:.0e}; {time.perf_counter() - t0:.0f} s)")


# sample, eval -----------------------------------------------------------------------------------------------------

def sample_check(log: str, subject: str) -> int:
    """The trainer prints `sample:` then the prompt and its continuation."""
    with open(log, errors="replace") as f:
        lines = f.read().splitlines()
    at = next((i for i, line in enumerate(lines) if line == "sample:"), None)
    if at is None or at + 1 >= len(lines) or not lines[at + 1].strip():
        return verdict("sample", subject, False, f"no end-of-run sample in {log}")
    return verdict("sample", subject, True, f"the run printed its end-of-run sample ({lines[at + 1][:40]!r}…)")


def eval_check(command: list[str], *, results: str, log: str, subject: str) -> int:
    code = run_logged(command, log)
    if code != 0:
        return verdict("eval", subject, False, f"python -m trainer.eval exited {code}; its log is {log}")
    with open(results) as f:
        datasets = json.load(f)["datasets"]
    figures = {name: d["bpb"] for name, d in datasets.items()}
    ok = bool(figures) and all(math.isfinite(b) and b > 0 for b in figures.values())
    shown = ", ".join(f"{name} bpb {b:.4f}" for name, b in figures.items())
    return verdict("eval", subject, ok, shown or "no dataset scored")


def run_logged(command: list[str], log: str, mode: str = "w") -> int:
    with open(log, mode) as out:
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT).returncode


# preempt ----------------------------------------------------------------------------------------------------------

def children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (from /proc: no ps needed)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:  # gone meanwhile
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry))
    return found


def logged_step(run_dir: str) -> int:
    """The newest step in the run's metrics (0 before the first log step)."""
    from trainer.metrics import read_metrics

    try:
        return max((m["step"] for m in read_metrics(run_dir)), default=0)
    except (OSError, ValueError):  # a line half written
        return 0


def signal_rank_after(proc: subprocess.Popen, run_dir: str, step: int, timeout_s: float) -> str | None:
    """SIGTERM to torchrun's training rank once the run has logged `step`; why it could not be sent, or None."""
    deadline = time.monotonic() + timeout_s
    while logged_step(run_dir) < step:
        if proc.poll() is not None:
            return f"the run exited ({proc.returncode}) before step {step}"
        if time.monotonic() > deadline:
            return f"no step {step} in {timeout_s:.0f} s"
        time.sleep(0.1)
    ranks = children(proc.pid)
    if len(ranks) != 1:
        return f"torchrun (pid {proc.pid}) has {len(ranks)} child processes, not the one training rank"
    os.kill(ranks[0], signal.SIGTERM)
    return None


def preempt_check(command: list[str], *, run_dir: str, log: str, after_step: int, subject: str,
                  timeout_s: float) -> int:
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            problem = signal_rank_after(proc, run_dir, after_step, timeout_s)
            proc.wait(timeout=timeout_s)
        finally:
            if proc.poll() is None:
                proc.kill()
    if problem:
        return verdict("preempt", subject, False, f"{problem}; its log is {log}")
    with open(log, errors="replace") as f:
        notice = NOTICE.search(f.read())
    if notice is None:
        return verdict("preempt", subject, False, f"no preemption notice logged (exit {proc.returncode}); see {log}")
    step, since, grace = int(notice[1]), float(notice[2]), float(notice[3])
    committed = os.path.exists(os.path.join(run_dir, "checkpoints", f"step-{step:06d}", "COMMITTED"))
    said = f"checkpoint at step {step} committed {since:.1f} s after SIGTERM (grace {grace:.0f} s)"
    if since > grace or not committed:
        return verdict("preempt", subject, False, f"{said}, COMMITTED file {'present' if committed else 'absent'}")
    resumed_log = log.replace(".log", "") + "-resumed.log"
    code = run_logged(command, resumed_log)
    with open(resumed_log, errors="replace") as f:
        resumed = RESUMED.search(f.read())
    ok = code == 0 and resumed is not None and int(resumed[1]) == step
    again = f"resumed from step {resumed[1]}" if resumed else "did not resume"
    return verdict("preempt", subject, ok, f"{said}; the same command {again}, exit {code}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="check", required=True)
    flex = sub.add_parser("flex")
    flex.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    sample = sub.add_parser("sample")
    sample.add_argument("log")
    sample.add_argument("--subject", required=True)
    ev = sub.add_parser("eval")
    pre = sub.add_parser("preempt")
    for p in (ev, pre):
        p.add_argument("--log", required=True)
        p.add_argument("--subject", required=True)
        p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command")
    ev.add_argument("--results", required=True)
    pre.add_argument("--run-dir", required=True)
    pre.add_argument("--after-step", type=int, required=True)
    pre.add_argument("--timeout-s", type=float, default=600.0)
    args = ap.parse_args()
    try:
        return run_check(args)
    except Exception as exc:  # a crash is this check's FAIL line; the traceback goes to stderr (gpu.sh: its log)
        traceback.print_exc()
        reason = (str(exc).splitlines() or [""])[0][:200]
        return verdict(args.check, getattr(args, "subject", "packed vs alone"), False,
                       f"{type(exc).__name__}: {reason} (traceback on stderr)")


def run_check(args: argparse.Namespace) -> int:
    command = list(getattr(args, "command", []))
    command = command[1:] if command[:1] == ["--"] else command
    if args.check == "flex":
        return flex_check(args.device)
    if args.check == "sample":
        return sample_check(args.log, args.subject)
    if args.check == "eval":
        return eval_check(command, results=args.results, log=args.log, subject=args.subject)
    return preempt_check(command, run_dir=args.run_dir, log=args.log, after_step=args.after_step,
                         subject=args.subject, timeout_s=args.timeout_s)


if __name__ == "__main__":
    sys.exit(main())
