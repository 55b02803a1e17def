"""The README's commands are the ones that work: CI runs the test command verbatim, every command of its ```bash
blocks that can run on CPU runs here at a reduced size, and its output excerpts have the shape the programs print."""

import contextlib
import io
import json
import re
import subprocess
import sys
import time

import pytest

from benchmarks.readme_excerpts import (GAP, README, ROOT, SELECT, SHOWN_DIR, UNTIL_NEXT, Command, excerpts,
                                        python_argv, readme_commands, workdir)


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    first = [line for line in README.read_text().splitlines() if line.startswith("python3 -m venv .venv && ")]
    main_cmd, test_cmd = first[:2]
    assert main_cmd.endswith(".venv/bin/python -m dataprep && .venv/bin/python -m trainer --config configs/demo.toml")
    assert "pip install torch==2.13.0" in main_cmd
    assert test_cmd.endswith(".venv/bin/python -m pytest") and "'.[test]'" in test_cmd
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci_lines


SKIP = {  # a README command matching the pattern is not run here, for the reason given (the first that matches)
    r"^ray job submit ": "a job for a remote cluster",
    r"^python3 -m venv |pip install ": "installs: the test runs in the environment it was installed in",
    r"^python -m pytest": "the test suite itself (CI runs it; see the test above)",
    r"(^| )'?\[|\.\.\.|\b(PATH|DIR|DATASET|RUN_DIR|HF_DIR|DATA|RUN)\b|X\.toml":
        "a synopsis: placeholders and optional parts, not a command",
    r"llama3-8b|configs/1b\.toml": "an 8B or 1B model for GPUs, with s3:// buckets",
    r"runs/tune/best\.toml": "the μP proxy study's output (that study is an 8B model's, on s3://)",
    r"--tasks hellaswag": "lm-evaluation-harness downloads hellaswag from the Hugging Face Hub",
    r"^python -m benchmarks\.": "a benchmark: minutes to half an hour each, never in the test suite",
}

SMALL_MODEL = ("--model.dim=64", "--model.n_layers=2", "--model.ffn_hidden=128")
SHORT_RUN = ("--train.steps=4", "--train.log_every=2", "--train.eval_every=2")
RUN = {  # command prefix (the longest that matches wins) -> (arguments appended: a reduced size, output line(s))
    "python -m dataprep": (("--max-files", "40", "--vocab-size", "1000", "--seq-len", "64", "--val-fraction", "0.1"),
                           "dataprep: 40 files -> "),
    "python -m dataprep --format chat": ((), "dataprep: 1 files -> 98 documents"),
    "python -m dataprep --input tune": (("--seq-len", "64"), " files -> "),
    "python -m trainer --help": ((), "--optim.lr"),
    "python -m trainer --config configs/demo.toml": ((*SMALL_MODEL, *SHORT_RUN, "--train.sample_tokens=8"),
                                                     ("step      4 | loss", "validation loss: ", "sample:\ndef",
                                                      "finished; config, metrics.jsonl")),
    "python -m trainer --config configs/sft-demo.toml": ((*SMALL_MODEL, *SHORT_RUN), "finished; config, metrics.jsonl"),
    "python -m trainer.generate": (("--max_new_tokens", "8"), "def"),
    "python -m trainer.export": ((), "wrote Hugging Face folder hf/"),
    "python -m trainer.export --from-hf": ((), "wrote raylm weights runs/demo.pt"),
    "python -m trainer.chat": (("--max_new_tokens", "8"), "model> "),
    "python -m trainer.eval": ((), "on 1 worker(s):"),
    "python -m tune": (("--tune.samples", "2", "--tune.budget_tokens", "4096"), "best: lr "),  # a step of 16 a mark
}
STDIN = {"python -m trainer.chat": "Write a haiku about rain.\n/quit\n"}

RAY_LINE = re.compile(
    r"^\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\]"  # Ray's C++ logging, any level
    r"|^\d{4}-\d\d-\d\d [\d:,]+\s+(DEBUG|INFO)\s"  # Ray's Python logging below WARNING (Ray Data, Tune, Train)
    r"|\((raylet|RayTrainWorker|TrainController|MapWorker)[^)]*\)"  # a worker's process prefix
    r"|token authentication"
)


def plan() -> list[tuple[Command, str | None, str | None]]:
    """(command, the RUN prefix it runs under or None, the SKIP reason or None) for every README command."""
    out = []
    for command in readme_commands(README.read_text()):
        reason = next((why for pattern, why in SKIP.items() if re.search(pattern, command.text)), None)
        prefix = max((p for p in RUN if command.starts(p)), key=len, default=None)
        out.append((command, prefix, reason))
    return out


def test_every_readme_command_is_run_or_skipped_for_a_stated_reason():
    """A new README command fails here until it is given a reduced size and an output line (RUN) or a reason
    (SKIP); every rule still matches something, so none outlives its command."""
    rows = plan()
    assert [c.text for c, prefix, reason in rows if prefix is None and reason is None] == []
    assert len([r for r in rows if r[1] and not r[2]]) >= 12
    assert {p for _, p, reason in rows if not reason} == set(RUN)
    assert {p for p in SKIP if not any(re.search(p, c.text) for c, _, _ in rows)} == set()


def entry_points() -> list[str]:
    """The raylm modules the README runs (`python -m M`, `torchrun ... -m M`): its commands, skipped ones included,
    and those its prose names inline."""
    found = {c.argv[c.argv.index("-m") + 1] for c, _, _ in plan() if "-m" in c.argv}
    found |= set(re.findall(r"-m ([a-z][\w.]*[a-z])", README.read_text()))
    return sorted(m for m in found if m.split(".")[0] in {"dataprep", "trainer", "tune"})


HELP_ALL = """
import contextlib, io, json, runpy, sys, traceback
answers = {}
for module in sys.argv[1:]:
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv = [module, "--help"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code or 0
        except Exception:
            code = traceback.print_exc() or 1
    answers[module] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(answers))
"""
"""`python -m M --help` for each M named on its command line, in one new Python: {M: [exit code, stdout, stderr]}."""


@pytest.fixture(scope="module")
def help_answers() -> dict[str, list]:
    """Every entry point's answer to --help, each module run as `python -m` runs it (runpy, as __main__) by one new
    Python, not the test's: one interpreter pays the imports (torch's, Ray's) once instead of once per module."""
    proc = subprocess.run([sys.executable, "-c", HELP_ALL, *entry_points()], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("module", entry_points())
def test_every_documented_entry_point_answers_help(module, help_answers):
    """Every `-m` module a README command names still starts where the command says (also those the test above
    skips, such as `python -m trainer.harness` with tasks from the Hub, and modules that moved into a package)."""
    code, out, err = help_answers[module]
    assert code == 0 and out.startswith("usage: "), err


def test_readme_commands_run_on_cpu(own_ray_env, tmp_path):
    """Every README command that runs on CPU, in README order, in one directory (so runs/demo, data/stdlib and hf/
    are the ones the earlier commands made), each at a reduced size as a newcomer runs it (its own local Ray):
    exit 0, its expected line, and raylm's lines only (no Ray chatter below WARNING, no colour codes)."""
    from raylm.config import load_config
    from raylm.dataset import open_dataset
    from trainer.job import JobConfig

    cwd = workdir(tmp_path / "checkout")
    env = {**own_ray_env, "PYTHONPATH": str(ROOT)}
    outputs = {}
    for command, prefix, reason in plan():
        if reason:
            print(f"skipped: {command.text}  ({reason})")
            continue
        extra, expected = RUN[prefix]
        start = time.monotonic()
        proc = subprocess.run([*python_argv(command), *extra], cwd=cwd, env=env, input=STDIN.get(prefix, ""),
                              capture_output=True, text=True, timeout=300)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{command.text}\n{output[-3000:]}"
        for line in (expected,) if isinstance(expected, str) else expected:
            assert line in output, f"{command.text}: no {line!r} in\n{output[-3000:]}"
        assert "\x1b[" not in output and [line for line in output.splitlines() if RAY_LINE.search(line)] == [], \
            f"{command.text}\n{output[-3000:]}"
        print(f"ran in {time.monotonic() - start:.0f} s: {command.text} {' '.join(extra)}")
        outputs.setdefault(prefix, output.replace(str(cwd), SHOWN_DIR).splitlines())
    excerpts_shaped_as_printed(outputs)

    # the demo's sample prompt is one a trained model continues (no lone '▁', which training rarely sees)
    prompt = load_config(JobConfig, str(ROOT / "configs" / "demo.toml")).train.sample_prompt
    sp = open_dataset(str(cwd / "data" / "stdlib")).tokenizer()
    assert prompt and "▁" not in [sp.token_string(i) for i in sp.encode([prompt])[0]]


def excerpts_shaped_as_printed(outputs: dict[str, list[str]]) -> None:
    """Each README excerpt line that the excerpt's pattern (benchmarks/readme_excerpts.py's SELECT) also finds in
    this reduced run's output has that line's shape: the dataprep summary, the model line, the first log lines and
    trainer.eval's first line as the programs print them today, not as they did when the excerpts were made (the
    eval table's rows: test_excerpts_have_the_shape_the_programs_print)."""
    shown, compared = excerpts(README.read_text()), 0
    for name, (prefixes, patterns) in SELECT.items():
        printed_now = [line for prefix in prefixes for line in outputs[prefix]]
        for pattern in patterns:
            if pattern in (GAP, UNTIL_NEXT):
                continue
            now = [shape(line) for line in printed_now if re.search(pattern, line)][:1]
            if now:
                readme = [line for line in shown[name] if re.search(pattern, line)][:1]
                assert [shape(line) for line in readme] == now, (name, pattern)
                compared += 1
    assert compared >= 10


def shape(line: str) -> str:
    """A line with its numbers written 9 (node ids H) and runs of spaces as one: what stays when only the figures
    change."""
    line = re.sub(r"\b[0-9a-f]{8}\b", "H", line)
    line = re.sub(r" +", " ", re.sub(r"-?\d[\d,]*(\.\d+)?(e[-+]\d+)?", "9", line)).strip()
    return re.sub(r"( -> 9 \(step 9\))+", r"\1", line)  # the validation curve, however many points it has


def printed(print_summary, *args) -> list[str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_summary(*args)
    return out.getvalue().splitlines()


def test_excerpts_have_the_shape_the_programs_print():
    """Each excerpt line that a raylm formatter prints (training log lines, the end-of-run summary, trainer.eval's
    table) is shaped as that formatter prints it today, so a new or renamed field fails here until the excerpts
    are regenerated (`python -m benchmarks.readme_excerpts`)."""
    from trainer.__main__ import print_summary
    from trainer.eval.cli import table
    from trainer.job import JobConfig
    from trainer.metrics import format_line

    val = {"val_loss": 3.7, "val_ppl": 42.2, "val_bpb": 1.5}
    log = {"loss": 4.1, "lr": 3e-4, "grad_norm": 0.5, "tokens_per_s": 3055.0, "mfu": 0.35, "step_time_s": 1.3,
           "data_wait_share": 0.0, "peak_mem_gib": 1.2}
    job = JobConfig()
    job.run.dir = "/home/you/raylm/runs/demo"
    summary = printed(print_summary, job, {"history": [{"step": 0, **val}, {"step": 250, **val}], "sample": "def"})
    figures = {"tokens": 10, "loss": 1.0, "ppl": 2.7, "bpb": 1.1}
    results = {"datasets": {"stdlib": figures, "heldout": {**figures, "by_source": {"tune": figures}}},
               "tasks": {"task": {"items": 24, "acc": 0.5, "acc_norm": 0.5}}}
    known = {shape(line) for line in [format_line({"step": 0, **val}), format_line({"step": 25, **log}),
                                      format_line({"step": 250, **log, **val}), *summary, *table(results).splitlines()]}

    shown = excerpts(README.read_text())
    assert {"main", "eval"} <= shown.keys()
    main = [line for line in shown["main"] if re.match(r"step |validation loss: |sample:$|finished; ", line)]
    table_lines = [line for line in shown["eval"][1:] if line.strip()]  # under the "CHECKPOINT on W worker(s):" line
    assert len(main) >= 6 and table_lines, shown
    assert [line for line in main + table_lines if shape(line) not in known] == []
    assert GAP in shown["main"]


def test_excerpt_regions_are_rewritten_from_the_lines_selected():
    """benchmarks/readme_excerpts.py's own pieces: lines picked in order (a gap shown, a run of lines up to the next
    pattern's taken whole, a line printed out of order still found), and only the named region rewritten."""
    from benchmarks.readme_excerpts import replace_excerpts, select

    lines = ["a 1", "noise", "ckpt", "b 2", "sample:", "x", "y", "done"]
    assert select(lines, [r"^a ", GAP, r"^b ", r"^ckpt", r"^sample:", UNTIL_NEXT, r"^done"]) == \
        ["a 1", GAP, "b 2", "ckpt", "sample:", "x", "y", "done"]
    text = "t\n<!-- excerpt: one -->\n```\nold\n```\n<!-- /excerpt -->\n<!-- excerpt: two -->\n```\nkept\n```\n" \
           "<!-- /excerpt -->\n"
    new = replace_excerpts(text, {"one": ["n1", "n2"]})
    assert excerpts(new) == {"one": ["n1", "n2"], "two": ["kept"]}
    assert new.replace("n1\nn2", "old") == text
