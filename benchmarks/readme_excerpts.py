"""Regenerate README.md's output excerpts from a real run of the README's own commands, so they cannot drift.

    python -m benchmarks.readme_excerpts [--dir DIR] [--only main,eval]

The README marks each excerpt of program output as a fenced block between `<!-- excerpt: NAME -->` and
`<!-- /excerpt -->`. This script runs, in README order and at the README's full size, the README commands the
excerpts come from (the main job, the held-out dataset, `trainer.eval`: ~10 min on 2 cores), in DIR (default: a new
temporary directory holding links to configs/, examples/ and the other inputs the commands name), picks each
excerpt's lines from what the commands printed and rewrites those regions of README.md. DIR's path is written as
/home/you/raylm. tests/test_readme.py reads the same command blocks (`readme_commands`) to run them at a reduced
size, and checks that every excerpt line has the shape the program prints today.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
INPUTS = ("configs", "examples", "tune")
"""The checkout's folders a README command reads, linked into the directory the commands run in (`tune/`: the
held-out corpus of the Evaluation section, Python the demo never trained on)."""
SHOWN_DIR = "/home/you/raylm"

EXCERPT = re.compile(r"(<!-- excerpt: (?P<name>[\w-]+) -->\n```[^\n]*\n)(?P<body>.*?)(\n```\n<!-- /excerpt -->)", re.S)


@dataclass(frozen=True)
class Command:
    """One command of a README ```bash block: `text` as a user types it (continuation lines joined, comment cut,
    `.venv/bin/python` written `python`); `argv` its words; `block` the block's number (0-based, ```bash only)."""

    block: int
    text: str
    argv: tuple[str, ...]

    def starts(self, prefix: str) -> bool:
        return self.text == prefix or self.text.startswith(prefix + " ")


def readme_commands(text: str) -> list[Command]:
    """Every command of the README's ```bash blocks, in order; `a && b` is two commands."""
    out = []
    for block, body in enumerate(re.findall(r"^```bash\n(.*?)^```$", text, re.S | re.M)):
        for line in re.sub(r"\\\n\s*", "", body).splitlines():
            words = shlex.split(line, comments=True)
            while words:
                end = words.index("&&") if "&&" in words else len(words)
                shown = ["python" if words[0] == ".venv/bin/python" else words[0], *words[1:end]]
                out.append(Command(block, shlex.join(shown), tuple(words[:end])))
                words = words[end + 1:]
    return out


def excerpts(text: str) -> dict[str, list[str]]:
    """Each marked excerpt's lines, by name."""
    return {m["name"]: m["body"].splitlines() for m in EXCERPT.finditer(text)}


def replace_excerpts(text: str, new: dict[str, list[str]]) -> str:
    """README text with the named excerpts' bodies replaced (the others kept)."""
    return EXCERPT.sub(lambda m: m[1] + "\n".join(new.get(m["name"], m["body"].splitlines())) + m[4], text)


def workdir(path: pathlib.Path) -> pathlib.Path:
    """`path`, made to look like a checkout to the README's commands: links to its inputs, outputs written there."""
    path.mkdir(parents=True, exist_ok=True)
    for name in INPUTS:
        if not (path / name).exists():
            (path / name).symlink_to(ROOT / name)
    return path


def python_argv(command: Command) -> list[str]:
    """The command's argv with its Python (`python`, `.venv/bin/python`) replaced by this one."""
    first, *rest = command.argv
    is_python = first in ("python", "python3") or first.endswith("/python")
    return [sys.executable, *rest] if is_python else list(command.argv)


# Which lines of the commands' output each excerpt shows: patterns matched in order, each taking the first line that
# matches after the previous one; GAP shows as "  ..." (lines left out) and UNTIL_NEXT takes every line up to the
# next pattern's (or the end).
GAP, UNTIL_NEXT = "  ...", None
SELECT = {
    "main": (("python -m dataprep", "python -m trainer --config configs/demo.toml"), [
        r" corpus: ", r" trained a ", r"^dataprep: ", r"^  throughput: ", r"^  driver: ", r"^  time: ", GAP,
        r"^model ", r"^step +0 \|", r"^step +25 \|", GAP, r"^checkpoint .*/step-000250 committed",
        r"^step +250 \|", r"^validation loss: ", r"^sample:$", UNTIL_NEXT, r"^finished; "]),
    "eval": (("python -m dataprep --input tune", "python -m trainer.eval"), [r" on \d+ worker\(s\):$", UNTIL_NEXT]),
}


def select(lines: list[str], patterns: list) -> list[str]:
    """The excerpt: the lines `patterns` pick (see SELECT)."""
    out, at, pending = [], 0, False
    for pattern in patterns:
        if pattern is GAP:
            out.append(GAP)
            continue
        if pattern is UNTIL_NEXT:
            pending = True
            continue
        found = next((i for i in range(at, len(lines)) if re.search(pattern, lines[i])), None)
        if found is None:  # printed before the previous pattern's line this time (a checkpoint committing is a thread)
            found = next(i for i in range(len(lines)) if re.search(pattern, lines[i]))
            out.append(lines[found])
            continue
        out += lines[at:found] if pending else []
        out.append(lines[found])
        at, pending = found + 1, False
    return out + (lines[at:] if pending else [])


def run(command: Command, cwd: pathlib.Path, log: pathlib.Path) -> list[str]:
    """Run one README command in `cwd` as a user would (its own local Ray); its output lines, DIR shown as
    SHOWN_DIR, also kept in `log` (a run of ten minutes is not lost to a pattern that no longer matches: fix SELECT
    and pass --reuse). A failure stops the script with the command's output."""
    if log.exists():
        return log.read_text().splitlines()
    print(f"$ {command.text}", file=sys.stderr, flush=True)
    proc = subprocess.run(python_argv(command), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    if proc.returncode:
        sys.exit(f"{command.text} exited {proc.returncode}:\n{proc.stdout[-4000:]}")
    shown = proc.stdout.replace(str(cwd.resolve()), SHOWN_DIR).replace(str(cwd), SHOWN_DIR)
    log.write_text(shown)
    return shown.splitlines()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.readme_excerpts", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=pathlib.Path, help="where the commands run and write (default: a new temp dir)")
    p.add_argument("--only", help="comma-separated excerpt names (default: all)")
    p.add_argument("--reuse", action="store_true", help="take each command's output from DIR/output/ where an "
                                                         "earlier run of this script left it, instead of running it")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else list(SELECT)
    text = README.read_text()
    cwd = workdir(args.dir or pathlib.Path(tempfile.mkdtemp(prefix="raylm-readme-")))
    if args.reuse and not args.dir:
        p.error("--reuse needs the --dir of an earlier run")
    (cwd / "output").mkdir(exist_ok=True)
    if not args.reuse:
        for old in (cwd / "output").iterdir():
            old.unlink()
    wanted = {prefix for name in names for prefix in SELECT[name][0]}
    outputs: dict[str, list[str]] = {}
    for command in readme_commands(text):
        prefix = max((w for w in wanted if command.starts(w)), key=len, default=None)
        if prefix is not None and prefix not in outputs:
            outputs[prefix] = run(command, cwd, cwd / "output" / (re.sub(r"\W+", "-", prefix) + ".txt"))
    new = {name: select([line for prefix in SELECT[name][0] for line in outputs[prefix]], SELECT[name][1])
           for name in names}
    README.write_text(replace_excerpts(README.read_text(), new))  # as it is now: it may have been edited meanwhile
    print(f"rewrote {', '.join(names)} in {README} from the run in {cwd}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
