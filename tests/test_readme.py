"""The README's two commands are the ones that work: CI runs the test command verbatim."""

import pathlib
import re
import subprocess
import sys


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


RAY_LINE = re.compile(
    r"^\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\]"  # Ray's C++ logging, any level
    r"|^\d{4}-\d\d-\d\d [\d:,]+\s+(DEBUG|INFO)\s"  # Ray's Python logging below WARNING (Ray Data, Tune, Train)
    r"|\((raylet|RayTrainWorker|TrainController|MapWorker)[^)]*\)"  # a worker's process prefix
    r"|token authentication"
)


def test_main_job_output_is_raylm_lines_only(own_ray_env, tmp_path):
    """The main job at a reduced size, as a newcomer runs it (its own local Ray, output to a file): raylm's story
    only, no Ray chatter below WARNING, no colour codes; and the demo's sample prompt is one a trained model
    continues (no lone '▁', which training rarely sees)."""
    from dataprep import open_dataset
    from raylm.config import load_config
    from trainer.job import JobConfig

    env = own_ray_env
    data, run = tmp_path / "data", tmp_path / "run"
    dataprep = subprocess.run([sys.executable, "-m", "dataprep", "--max-files", "40", "--vocab-size", "1000",
                               "--seq-len", "64", "--val-fraction", "0.1", "--output", str(data)], capture_output=True, text=True, env=env,
                              timeout=300)
    train = subprocess.run([sys.executable, "-m", "trainer", "--config", "configs/demo.toml", "--data.path", str(data),
                            "--run.dir", str(run), "--model.dim=64", "--model.n_layers=2", "--model.ffn_hidden=128",
                            "--train.steps=4", "--train.log_every=2", "--train.eval_every=2",
                            "--train.sample_tokens=8"], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert dataprep.returncode == 0 and train.returncode == 0, (dataprep.stderr + train.stderr)[-3000:]
    output = dataprep.stdout + dataprep.stderr + train.stdout + train.stderr
    assert "\x1b[" not in output
    assert [line for line in output.splitlines() if RAY_LINE.search(line)] == []
    for expected in ("dataprep: 40 files", "step      4 | loss", "validation loss:", "sample:\ndef", "finished;"):
        assert expected in output, output

    prompt = load_config(JobConfig, str(ROOT / "configs" / "demo.toml")).train.sample_prompt
    sp = open_dataset(str(data)).tokenizer()
    assert prompt and "▁" not in [sp.token_string(i) for i in sp.encode([prompt])[0]]
