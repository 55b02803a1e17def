"""A run's metrics on object storage and on local disk: bytes uploaded, the one stream every reader reads, a resume,
and a writer that cannot keep up."""

from __future__ import annotations

import json
import logging
import os
import random

from trainer.metrics import MetricsLog, read_metrics


def log_line(step: int, rng: random.Random) -> dict:
    """A training log step's line as the trainer writes it (about 300 bytes)."""
    m = {"step": step, "loss": rng.uniform(2, 9), "lr": rng.uniform(0, 3e-3), "grad_norm": rng.uniform(0, 5),
         "tokens_per_s": rng.uniform(1e4, 1e6), "mfu": rng.uniform(0, 0.6), "step_time_s": rng.uniform(0.1, 2),
         "data_wait_share": rng.uniform(0, 0.1), "peak_mem_gib": rng.uniform(1, 70), "tokens": step * 524288,
         "checkpoint_blocked_s": rng.uniform(0, 1), "workers": 64}
    if step % 100 == 0:
        m.update(val_loss=m["loss"], val_ppl=2.0 ** m["loss"], val_bpb=m["loss"] / 4)
    return m


def put_bytes(recording: str, prefix: str) -> tuple[int, int]:
    """(requests, bytes of data PUT) to keys under `prefix`, from moto's log of the requests it served. The data of a
    PUT is its payload before aws-chunked framing (pyarrow uploads even a small object as one multipart part)."""
    sent = [e for e in map(json.loads, open(recording)) if e["method"] in ("PUT", "POST") and prefix in e["url"]]
    data = [e["headers"].get("X-Amz-Decoded-Content-Length", e["headers"].get("Content-Length", 0))
            for e in sent if e["method"] == "PUT"]
    return len(sent), sum(map(int, data))


def test_metrics_on_s3_upload_about_their_size_and_read_back_as_one_stream(s3_server, tmp_path, monkeypatch):
    """300 log steps (4 chunks of 64 lines and a tail), each written on its own (the slowest case: a writer that
    keeps up puts one line at a time), upload at most 3x the bytes of the final metrics.jsonl (rewriting the whole
    file at every step: ~150x); the segments read back as the lines written, and a resume keeps the lines up to its
    step (inside a chunk), as a local file does."""
    from moto.moto_api import recorder

    run, rng = f"{s3_server}/runs/metrics-bytes", random.Random(0)
    lines = [log_line(step, rng) for step in range(1, 301)]
    monkeypatch.setattr(recorder, "_location", str(tmp_path / "requests.jsonl"))
    recorder.start_recording()
    try:
        sink = MetricsLog(run, start_step=0)
        for m in lines:
            sink.write(m)
            sink.backlog.join()
        sink.close()
    finally:
        recorder.stop_recording()
    final = sum(len(json.dumps(m, sort_keys=True)) + 1 for m in lines)
    requests, sent = put_bytes(tmp_path / "requests.jsonl", "/runs/metrics-bytes/metrics")  # metrics/… or metrics.jsonl
    print(f"{requests} writing requests, {sent:,} bytes PUT for {final:,} bytes of metrics ({sent / final:.2f}x)")
    assert final < sent <= 3 * final
    assert read_metrics(run) == lines

    resumed = MetricsLog(run, start_step=200)  # a checkpoint of step 200: 60 of the 100 lines after it are logged again
    assert resumed.last("loss") == lines[199]["loss"] and resumed.last("val_loss") == lines[199]["val_loss"]
    again = [log_line(step, rng) for step in range(201, 261)]
    for m in again:
        resumed.write(m)
    resumed.close()
    assert read_metrics(run) == lines[:200] + again
    assert MetricsLog(run, start_step=0).last("loss") is None and read_metrics(run) == []  # a fresh start


def test_local_metrics_are_one_file_cut_at_the_resume_step(tmp_path):
    run, rng = str(tmp_path / "run"), random.Random(1)
    lines = [log_line(step, rng) for step in range(1, 201)]
    sink = MetricsLog(run, start_step=0)
    for m in lines:
        sink.write(m)
    sink.close()
    resumed = MetricsLog(run, start_step=150)
    more = [log_line(step, rng) for step in range(151, 161)]
    for m in more:
        resumed.write(m)
    resumed.close()
    assert sorted(os.listdir(run)) == ["metrics.jsonl", "tb"]
    assert read_metrics(run) == lines[:150] + more
    assert [json.loads(l) for l in open(f"{run}/metrics.jsonl")] == lines[:150] + more


def test_a_writer_that_cannot_keep_up_drops_lines_with_a_warning_and_never_blocks(tmp_path, monkeypatch, caplog):
    """metrics.jsonl made a FIFO nobody reads: the writer thread blocks on it as on a hung store. The loop's writes
    still return; past the bounded backlog each line is dropped with a warning, and once the store answers again
    everything kept is written, in order."""
    monkeypatch.setattr(MetricsLog, "BACKLOG", 3)
    run, rng = str(tmp_path / "run"), random.Random(2)
    sink = MetricsLog(run, start_step=0)
    os.remove(sink.path)
    os.mkfifo(sink.path)
    lines = [log_line(step, rng) for step in range(1, 2 * MetricsLog.BACKLOG + 2)]  # more than a batch and a backlog
    with caplog.at_level(logging.WARNING, logger="trainer.metrics"):
        for m in lines:
            sink.write(m)
    reader = os.open(sink.path, os.O_RDONLY | os.O_NONBLOCK)  # the store answers
    sink.close()
    written = [json.loads(l) for l in os.read(reader, 1 << 16).decode().splitlines()]
    os.close(reader)
    dropped = [r.getMessage() for r in caplog.records if "log lines late" in r.getMessage()]
    assert dropped and len(written) + len(dropped) == len(lines), (len(written), dropped)
    assert written == [m for m in lines if f"step {m['step']} is dropped" not in " ".join(dropped)]


def test_a_log_line_shows_the_lr_its_own_step_used(tmp_path):
    """Step N's line carries the lr of update N (0-based N - 1), not the next one's: two trials logging at the same
    token mark then show the same point of their schedules, and the last line shows the floor the run ended at."""
    from dataprep.__main__ import main as dataprep
    from helpers import jsonl_corpus, run_captured
    from trainer.__main__ import main as trainer
    from trainer.optim import OptimConfig, lr_factor

    jsonl_corpus(tmp_path / "corpus", files=2, lines=40)
    code, _, err = run_captured(dataprep, ["--input", tmp_path / "corpus", "--output", tmp_path / "ds", "--vocab-size",
                                           "320", "--seq-len", "32", "--val-fraction", "0", "--workers.local=true"])
    assert code == 0, err
    optim = OptimConfig(lr=1e-3, warmup_steps=3, schedule="cosine")
    code, _, err = run_captured(trainer, [
        "--no-ray", "--config", "configs/tiny.toml", "--data.path", str(tmp_path / "ds"), "--run.dir",
        str(tmp_path / "run"), "--train.steps=6", "--train.log_every=1", "--train.global_batch=2",
        "--train.micro_batch=2", "--train.eval_every=0", "--train.eval_rows=0", "--train.sample_prompt=",
        f"--optim.lr={optim.lr}", f"--optim.warmup_steps={optim.warmup_steps}", "--optim.schedule=cosine"])
    assert code == 0, err
    logged = {m["step"]: m["lr"] for m in read_metrics(str(tmp_path / "run")) if "lr" in m}
    assert list(logged) == [1, 2, 3, 4, 5, 6]
    for step, lr in logged.items():
        assert lr == optim.lr * lr_factor(step - 1, optim=optim, total_steps=6), step
    assert logged[6] == optim.lr * optim.min_lr_ratio
