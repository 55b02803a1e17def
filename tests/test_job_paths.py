"""Jobs keep their results: a command running in Ray's copy of a job's working directory (`ray job submit
--working-dir .`) refuses the relative paths that copy would lose, in one line; `.rayignore` leaves every output
folder the README makes out of the upload. (A real `ray job submit`: tests/test_cluster.py.)"""

from __future__ import annotations

import pathlib
import re
import shutil

import pytest

from raylm.cli import run_cli
from raylm.config import load_config
from raylm.paths import Role, check_job_paths, config_paths, job_copy

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIX = "use an absolute path or an s3:// URL"


@pytest.fixture
def copy(tmp_path, monkeypatch) -> pathlib.Path:
    """The working directory of a submitted job, where Ray unpacks the upload: configs/ came along, data/ did not."""
    where = tmp_path / "ray" / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123abcd"
    shutil.copytree(ROOT / "configs", where / "configs")
    (where / "examples").mkdir()
    (where / "examples" / "corpus.txt").write_text("uploaded with the job\n")
    monkeypatch.chdir(where)
    return where


def cli_error(main, argv: list[str], capsys) -> str:
    """The one line a command prints on stderr, after checking it exits 2 with that line alone."""
    assert run_cli(main, argv) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def commands():
    from dataprep.__main__ import main as dataprep
    from trainer.__main__ import main as trainer
    from trainer.eval.cli import main as evaluate
    from trainer.export import main as export
    from trainer.generate import main as generate
    from tune.__main__ import main as tune

    absent = "/nonexistent/raylm"  # absolute: refused later, for not existing, never for being relative
    return [
        (trainer, ["--config", "configs/tiny.toml", "--data.path", absent, "--run.dir", "runs/job1"],
         "--run.dir runs/job1"),
        (trainer, ["--config", "configs/tiny.toml", "--data.path", "data/stdlib", "--run.dir", f"{absent}/run"],
         "--data.path data/stdlib"),
        (trainer, ["--data.path", absent, "--run.dir", f"{absent}/run", "--checkpoint.resume_from", "runs/a"],
         "--checkpoint.resume_from runs/a"),
        (trainer, ["--data.path", absent, "--run.dir", f"{absent}/run", "--init.from_hf=hf/demo"],
         "--init.from_hf hf/demo"),
        (dataprep, ["--input", "examples/corpus.txt", "--output", "data/mine"], "--output.dir data/mine"),
        (dataprep, [], "--output.dir data/stdlib"),  # the demo's default
        (dataprep, ["--input", "corpus/*.txt", "--output", f"{absent}/ds"], "--input.paths corpus/*.txt"),
        (dataprep, ["--input", "examples/corpus.txt", "--tokenizer", "runs/demo", "--output", f"{absent}/ds"],
         "--tokenizer.file runs/demo"),
        (tune, ["--config", "configs/tiny.toml", "--data.path", absent, "--tune.dir", "runs/tune"],
         "--tune.dir runs/tune"),
        (evaluate, ["--checkpoint", absent, "--data.path", absent, "data/heldout"], "--eval.datasets data/heldout"),
        (evaluate, ["--checkpoint", absent, "--tasks", "TASK.jsonl"], "--eval.tasks TASK.jsonl"),
        (evaluate, ["--checkpoint", absent, "--data.path", absent, "--out", "r.json"], "--run.out r.json"),
        (export, ["--checkpoint", absent, "--out", "hf/demo"], "--out hf/demo"),
        (export, ["--from-hf", "hf/demo", "--out", f"{absent}/w.pt"], "--from-hf hf/demo"),
        (generate, ["--checkpoint", "runs/demo", "--prompt", "def"], "--checkpoint runs/demo"),
    ]


@pytest.mark.parametrize("case", range(len(commands())))
def test_a_jobs_copy_refuses_relative_paths_it_would_lose(case, copy, capsys):
    """Every command, every path option: an output relative to the copy, or an input the upload did not bring, is
    one line naming the option and its value, before anything is read or written."""
    main, argv, named = commands()[case]
    line = cli_error(main, argv, capsys)
    assert line.startswith(f"error: {named} is a relative path") and line.endswith(FIX), line
    assert str(copy) in line
    assert sorted(p.name for p in copy.iterdir()) == ["configs", "examples"]  # nothing written


def test_what_the_upload_brought_and_what_a_study_ignores_pass(copy, capsys):
    """A relative input that is in the copy (a preset, an example file) is read from there, as meant; a study's
    --run.dir (its trials run under --tune.dir) is not refused for a default it never uses."""
    from dataprep.__main__ import main as dataprep
    from tune.__main__ import main as tune

    line = cli_error(dataprep, ["--input", "examples/*.txt", "--tokenizer", "/nonexistent/tok.model",
                                "--output", str(copy.parent / "ds"), "--workers.local=true"], capsys)
    assert "relative" not in line and "/nonexistent/tok.model" in line, line
    line = cli_error(tune, ["--config", "configs/tiny.toml", "--data.path", "/nonexistent/ds",
                            "--tune.dir", str(copy.parent / "study")], capsys)
    assert "relative" not in line and "/nonexistent/ds" in line, line


def test_outside_a_jobs_copy_relative_paths_are_the_users(tmp_path, monkeypatch):
    """Run from a checkout (or a directory that merely has Ray's words in other places), nothing is refused."""
    for where in (tmp_path, tmp_path / "working_dir_files" / "_ray_pkg_1", tmp_path / "runtime_resources"):
        where.mkdir(parents=True, exist_ok=True)
        monkeypatch.chdir(where)
        assert job_copy() is None
        check_job_paths(inputs={"--data.path": "data/stdlib"}, outputs={"--run.dir": "runs/demo"})
    inside = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_1" / "sub"
    assert job_copy(str(inside)) == str(inside.parent)


# ----------------------------------------------------------------------------------------------------- .rayignore
OUTPUT_OPTIONS = r"--(?:output|run\.dir|out|tune\.dir)[ =](\S+)"


def readme_outputs() -> set[str]:
    """Local output paths of the README's commands (code blocks), placeholders (DIR, RUN_DIR) and s3:// left out,
    and the defaults a README command writes to without naming them (dataprep's demo, the trainer's and Tune's)."""
    from dataprep.__main__ import DEMO_PRESET
    from tune.config import TuneJobConfig

    blocks = re.findall(r"^```\w*\n(.*?)^```", (ROOT / "README.md").read_text(), re.M | re.S)
    found = {m.rstrip("]`.") for block in blocks for m in re.findall(OUTPUT_OPTIONS, block)}
    found = {p for p in found if not p.startswith("s3://") and not re.fullmatch(r"[A-Z_]+", p.split("/")[0])}
    defaults = config_paths(load_config(TuneJobConfig, None, []))[Role.OUTPUT]
    return found | {p for paths in defaults.values() for p in paths} | {DEMO_PRESET["output"]["dir"]}


def test_rayignore_leaves_every_output_folder_of_the_readme_out_of_the_upload():
    """`ray job submit --working-dir .` uploads the checkout less .rayignore (read here by Ray's own matcher): a
    dataset, run or exported model made by a README command must not go up with every job."""
    from ray._private.runtime_env.packaging import _get_ignore_file

    outputs = readme_outputs()
    folders = {p.split("/")[0] for p in outputs if "/" in p}
    assert {"data", "runs", "hf"} <= folders, outputs
    ignored = _get_ignore_file(ROOT, ".rayignore")
    assert [f for f in sorted(folders) if not ignored(ROOT / f / "any-file")] == []
    assert not ignored(ROOT / "configs" / "tiny.toml") and not ignored(ROOT / "trainer" / "train.py")
