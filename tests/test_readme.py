"""The README's two commands are the ones that work: CI runs the test command verbatim."""

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [line for line in text.splitlines() if line.startswith("python3 -m venv .venv && ")]


def test_readme_opens_with_two_commands_and_ci_runs_the_test_one():
    main_cmd, test_cmd = readme_commands()[:2]
    assert main_cmd.endswith(".venv/bin/python -m dataprep && .venv/bin/python -m trainer --config configs/demo.toml")
    assert "pip install torch==2.13.0" in main_cmd
    assert test_cmd.endswith(".venv/bin/python -m pytest") and "'.[test]'" in test_cmd
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci_lines
