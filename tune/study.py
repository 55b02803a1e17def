"""A Ray Tune study over short runs of the trainer: peak lr × global batch, compared at equal training tokens.

Each trial is a function trainable that runs the trainer under Ray Train (the same code as `python -m trainer`, on
`ray.num_workers` workers) and forwards its log steps to Tune. A trial validates at `tune.marks` equal token counts
whatever its batch size, and ASHA (time in tokens) stops the poor ones at those marks. A trial
whose loss diverges ends as "diverged" instead of failing the study.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import logging
import math
import os
import posixpath
import signal
import threading

from ray.tune import Callback

from raylm import storage
from raylm.config import dump_toml, from_dict, to_dict
from raylm.dataset import open_dataset
from raylm.errors import ConfigError, find_user_error
from raylm.ray_session import check_local_paths, init_ray, verbose
from trainer.data import check_fits
from trainer.eval.suite import check_evaluation, eval_paths
from trainer.job import JobConfig
from tune.config import MAX_WARMUP_FRACTION, TuneConfig, TuneJobConfig, proxy_model

log = logging.getLogger(__name__)

STUDY = "study"

COLUMNS = ("trial", "lr", "global_batch", "tokens", "final_val_loss", "best_val_loss", "status")


def trial_steps(batch: int, seq_len: int, tune: TuneConfig) -> tuple[int, int]:
    """(steps, steps between validation marks) of a trial: `marks` marks at exactly the same token counts, whatever
    the batch."""
    every = tune.mark_tokens(seq_len) // (batch * seq_len)
    return every * tune.marks, every


def warmup_fraction(tune: TuneConfig, seq_len: int, warmup_steps: int | None) -> float:
    """The share of its steps every trial warms up over: tune.warmup_fraction, or `warmup_steps` (an
    --optim.warmup_steps given on the command line) as steps of the shortest trial, the largest batch's (the
    others warm up over the same tokens). Refused, before any trial, when that is more than half of the trial."""
    if warmup_steps is None:
        return tune.warmup_fraction
    batch = max(tune.batch)
    shortest = trial_steps(batch, seq_len, tune)[0]
    if warmup_steps > MAX_WARMUP_FRACTION * shortest:
        raise ConfigError(f"--optim.warmup_steps={warmup_steps} is more than half of the shortest trial ({shortest} "
                          f"steps at global batch {batch}), which would never train at its lr for long: give at most "
                          f"{int(MAX_WARMUP_FRACTION * shortest)}, or drop it and each trial warms up over "
                          f"--tune.warmup_fraction={tune.warmup_fraction:g} of its steps")
    return warmup_steps / shortest


def trial_job(config: dict, study: dict, run_dir: str) -> JobConfig:
    """The training job of one trial: the study's job with the trial's lr and batch, sized to the token budget."""
    job, tune = from_dict(JobConfig, study["job"]), TuneConfig(**study["tune"])
    job.optim.lr, job.train.global_batch = config["lr"], config["batch"]
    if tune.proxy_dim:
        job.model = proxy_model(job.model, tune.proxy_dim)
    job.train.steps, job.train.eval_every = trial_steps(config["batch"], study["seq_len"], tune)
    job.optim.warmup_steps = round(tune.warmup_fraction * job.train.steps)  # the decay spans the rest of its steps
    job.train.log_every = job.checkpoint.every = job.train.eval_every  # every report carries val_loss
    job.train.max_loss = tune.diverged_loss(study["vocab_size"])
    job.train.sample_prompt = ""
    job.checkpoint.keep = 1
    job.ray.max_failures = 0  # a diverged trial is a result, not a failure to retry
    job.run.dir = run_dir
    return job


def run_trial(config: dict, study: dict) -> None:
    """One Tune trial: a Ray Train run of the trainer on `ray.num_workers` workers, its rank-0 reports forwarded
    to Tune (Ray 2.x's pattern: a TorchTrainer inside a function trainable, with TuneReportCallback)."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainer.ray_launch import launch
    from trainer.train import TrainingDiverged

    job = trial_job(config, study, storage.join(study["trials_dir"], ray.tune.get_context().get_trial_name()))
    try:
        launch(job, callbacks=[TuneReportCallback()], tasks=study["tasks"])
    except TrainingDiverged as exc:
        tokens = job.train.steps * job.train.global_batch * study["seq_len"]
        ray.tune.report({"tokens": tokens, "val_loss": math.inf, "diverged": True, "reason": str(exc)})


class StudyProgress(Callback):
    """raylm's own lines for a study, instead of Tune's status table (whose CPU column counts only what the trials
    hold themselves, nothing: their Ray Train workers reserve the CPUs) and its TensorBoard hint into Ray's session
    directory: a line when a trial starts and one when it ends, with what it reached (or where a Ctrl-C stopped it)."""

    def __init__(self, study: dict):
        self.tune, self.seq_len = TuneConfig(**study["tune"]), study["seq_len"]

    running = frozenset()
    """Ids of the trials started and not ended. A class default: Tune gives a resumed study back the callbacks it
    pickled when the study began, which for a study begun by an earlier raylm lack it."""

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running = self.running | {trial.trial_id}
        print(f"trial {trial}: started", flush=True)

    def on_experiment_end(self, trials, **info):
        """After a Ctrl-C, the trials it stopped: Tune ends them without on_trial_complete."""
        for trial in trials:
            if INTERRUPTED.is_set() and trial.trial_id in self.running:
                print(f"trial {trial}: interrupted at {(trial.last_result or {}).get('tokens', 0):,} tokens",
                      flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.running = self.running - {trial.trial_id}
        last, batch = trial.last_result or {}, trial.config["batch"]
        planned = trial_steps(batch, self.seq_len, self.tune)[0] * batch * self.seq_len
        status = ("diverged" if last.get("diverged") else "completed" if last.get("tokens", 0) >= planned
                  else "stopped early by ASHA")
        print(f"trial {trial}: {status} at {last.get('tokens', 0):,} tokens, val loss "
              f"{last.get('val_loss', math.nan):.4f}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running = self.running - {trial.trial_id}
        user_error = trial_user_error(trial)  # e.g. workers that found no room to start
        why = f": {user_error}" if user_error else f"; its logs are under {trial.path}"
        print(f"trial {trial}: failed{why}", flush=True)


def trial_name(trial) -> str:
    """A trial's name, and its directory's (in Tune's study and under trials/): whole and short, where Tune's own
    (trainable, id, then its parameters cut at 130 characters and a date) is cut mid-word in a table."""
    return f"{trial.trial_id}-lr{trial.config['lr']:.2e}-b{trial.config['batch']}"


INTERRUPTED = threading.Event()
"""Set by a Ctrl-C of the study. A signal is the process's; StudyProgress reads it by name, since a resumed study
gets its callbacks back from Tune's pickled state, not from this process."""

RESUME = "run the same command with --tune.resume to continue"


@contextlib.contextmanager
def interruptible():
    """Ctrl-C (SIGINT) ends the study as Tune's own handler would (sent on as SIGUSR1: its state saved once more,
    the trials stopped) and is remembered in INTERRUPTED, with Tune's closing lines (its `Tuner.restore(...)` advice
    among them) dropped: the study says how to resume. A second Ctrl-C stops waiting for that."""
    def on_sigint(sig, frame):
        if INTERRUPTED.is_set():
            raise KeyboardInterrupt(RESUME)
        INTERRUPTED.set()
        os.kill(os.getpid(), signal.SIGUSR1)

    tune_log = logging.getLogger("ray.tune.tune")
    closing = lambda record: not INTERRUPTED.is_set()  # noqa: E731 - a logging filter
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # read as the run starts: SIGINT stays ours
    previous = signal.signal(signal.SIGINT, on_sigint)
    tune_log.addFilter(closing)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        tune_log.removeFilter(closing)


def trial_user_error(trial):
    """The RaylmError a failed trial raised, if any, from the error Tune has just pickled on this machine (the copy
    in the study's storage comes later)."""
    import cloudpickle

    path = trial.pickled_error_file
    if not path or not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        return find_user_error(cloudpickle.load(f))


def study_path(tune: TuneConfig) -> tuple:
    fs, path = storage.filesystem(tune.dir)
    return fs, path, posixpath.join(path, STUDY)


def build_tuner(job: TuneJobConfig, *, seq_len: int, vocab_size: int, tasks: list):
    """A new Tuner, or the restored one of an interrupted study (`tune.resume`). `tasks`: [eval]'s tasks as the
    study tokenized them, shipped to every trial with its parameters."""
    from ray import tune as raytune
    from ray.tune.schedulers import ASHAScheduler

    cfg = job.tune
    fs, path, study = study_path(cfg)
    study_spec = {"job": to_dict(job), "tune": dataclasses.asdict(cfg), "seq_len": seq_len, "vocab_size": vocab_size,
                  "trials_dir": storage.join(cfg.dir, "trials"), "tasks": tasks}  # parameters, not the search space
    trainable = raytune.with_resources(raytune.with_parameters(run_trial, study=study_spec), TRIAL_DRIVER)
    exists = raytune.Tuner.can_restore(study, storage_filesystem=fs)
    if not verbose():  # Tune's newer console output prints its header and a TensorBoard hint even when silent
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    if cfg.resume:
        if not exists:
            raise ConfigError(f"--tune.resume: {cfg.dir} holds no study to resume; drop --tune.resume to start one")
        return raytune.Tuner.restore(study, trainable, resume_unfinished=True, storage_filesystem=fs)
    if exists:
        raise ConfigError(f"{cfg.dir} already holds a study: add --tune.resume to continue it, or pick another --tune.dir")
    grid = cfg.lr_grid
    param_space = {
        "lr": raytune.grid_search(grid) if grid else raytune.loguniform(*cfg.lr_range),
        "batch": raytune.grid_search(cfg.batch) if grid else raytune.choice(cfg.batch),
    }
    mark_tokens = cfg.mark_tokens(seq_len)
    return raytune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=raytune.TuneConfig(
            metric="val_loss", mode="min", num_samples=1 if grid else cfg.samples,  # training is deterministic
            trial_name_creator=trial_name, trial_dirname_creator=trial_name,
            search_alg=search_algorithm(cfg, cfg.max_concurrent or concurrent_trials(job)),
            scheduler=ASHAScheduler(time_attr="tokens", max_t=mark_tokens * cfg.marks,
                                    grace_period=mark_tokens * cfg.grace_marks, reduction_factor=cfg.reduction_factor),
        ),
        run_config=raytune.RunConfig(name=STUDY, storage_path=path, storage_filesystem=fs,
                                     **({} if verbose() else {"verbose": 0, "callbacks": [StudyProgress(study_spec)]})),
    )


def search_algorithm(cfg: TuneConfig, concurrent: int):
    """The searcher, limited to `concurrent` trials at once: a trial holds no CPU itself, so only this limit keeps
    more Ray Train runs from starting than the cluster has workers for."""
    if cfg.search == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch
        except ImportError:
            raise ConfigError("tune.search=optuna needs optuna: pip install optuna (or raylm[optuna])") from None
        from ray.tune.search import ConcurrencyLimiter

        return ConcurrencyLimiter(OptunaSearch(seed=cfg.seed), max_concurrent=concurrent)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=cfg.seed, max_concurrent=concurrent)


TRIAL_DRIVER = {"CPU": 0, "node:__internal_head__": 0.001}
"""What a trial itself holds: it only drives a Ray Train run whose workers reserve the CPUs/GPUs. Like Ray Train's
own controller it sits on the head node; a CPU held by each trial would strand a worker's worth of every node."""


def concurrent_trials(job: JobConfig) -> int:
    """As many trials as the cluster holds workers for: a trial takes `ray.num_workers` × `ray.cpus_per_worker` CPUs
    (or `ray.num_workers` GPUs)."""
    import ray

    total = ray.cluster_resources()
    per_trial = job.ray.num_workers * (1 if job.ray.use_gpu else job.ray.cpus_per_worker)
    return max(1, int(total.get("GPU" if job.ray.use_gpu else "CPU", 0) // per_trial))


def summarize(results, cfg: TuneConfig, seq_len: int) -> list[dict]:
    """One row per trial (with its validation curve) from Tune's results."""
    rows = []
    for result in results:
        config, last = result.config, result.metrics or {}
        frame = result.metrics_dataframe
        curve = [] if frame is None or "val_loss" not in frame else [
            (int(t), float(v)) for t, v in zip(frame["tokens"], frame["val_loss"]) if math.isfinite(v)]
        planned = trial_steps(config["batch"], seq_len, cfg)[0] * config["batch"] * seq_len
        if last.get("diverged"):
            status = "diverged"
        elif result.error is not None:
            status = "error"
        else:
            status = "completed" if last.get("tokens", 0) >= planned else "stopped early"
        losses = [v for _, v in curve]
        rows.append({"trial": posixpath.basename(result.path), "lr": config["lr"], "global_batch": config["batch"],
                     "tokens": int(last.get("tokens", 0)), "final_val_loss": losses[-1] if losses else math.nan,
                     "best_val_loss": min(losses) if losses else math.nan, "status": status, "curve": curve})
    return sorted(rows, key=lambda r: r["trial"])


def best_row(rows: list[dict]) -> dict:
    """The completed trial with the lowest final validation loss (all completed trials saw the same tokens)."""
    completed = [r for r in rows if r["status"] == "completed"]
    if not completed:
        raise ConfigError("no trial completed its token budget; widen --tune.lr or lower --tune.budget_tokens")
    return min(completed, key=lambda r: r["final_val_loss"])


BEST_RUN = "best-run"
"""best.toml's run directory, in the study directory: the next run never lands in an existing run's directory."""


def write_outputs(job: TuneJobConfig, rows: list[dict], best: dict, *, vocab_size: int) -> None:
    """results.csv, results.png and best.toml (the job with the best lr and batch, the dataset's vocabulary and a
    run directory of its own) in the study directory."""
    from tune.plot import plot_results

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    storage.write_bytes(storage.join(job.tune.dir, "results.csv"), out.getvalue().encode())
    storage.write_bytes(storage.join(job.tune.dir, "results.png"), plot_results(rows, best))
    tuned = from_dict(JobConfig, to_dict(job))
    tuned.optim.lr, tuned.train.global_batch = best["lr"], best["global_batch"]
    tuned.model.vocab_size, tuned.run.dir = vocab_size, storage.join(job.tune.dir, BEST_RUN)
    storage.write_bytes(storage.join(job.tune.dir, "best.toml"), (transfer_note(job) + dump_toml(tuned)).encode())


def transfer_note(job: TuneJobConfig) -> str:
    """best.toml's opening comment when the study ran on a proxy."""
    if not job.tune.proxy_dim:
        return ""
    return (f"# optim.lr and train.global_batch are the best of a study at proxy width {job.tune.proxy_dim} "
            f"(same depth, head_dim, data and tokens). This job is for model.dim = {job.model.dim}: under muP "
            f"(model.mup_base_dim = {job.model.mup_base_dim}) the best lr transfers across width.\n")


def format_table(rows: list[dict], best: dict) -> str:
    width = max(len("trial"), *(len(r["trial"]) for r in rows))
    lines = [f"{'trial':{width}s} {'lr':>9s} {'batch':>5s} {'tokens':>10s} {'final val':>9s} {'best val':>9s}  status"]
    for r in rows:
        mark = "  <- best" if r is best else ""
        lines.append(f"{r['trial']:{width}s} {r['lr']:9.2e} {r['global_batch']:5d} {r['tokens']:10,d} "
                     f"{r['final_val_loss']:9.4f} {r['best_val_loss']:9.4f}  {r['status']}{mark}")
    return "\n".join(lines)


def require_state_api() -> None:
    """Ray Train frees the workers of a trial ASHA stopped through Ray's State API (its PlacementGroupCleaner asks
    it whether the run's controller died); without the dashboard that serves it they stay reserved and the study
    hangs waiting for CPUs that never come back."""
    from ray._private.worker import get_dashboard_url
    from ray.util.state import list_nodes
    from ray.util.state.exception import RayStateApiException

    url = get_dashboard_url()  # this cluster's: with two local clusters, Ray's own lookup may find the other one
    try:
        if url:
            list_nodes(address=f"http://{url}", limit=1, timeout=30)
    except RayStateApiException:
        url = ""
    if not url:
        raise ConfigError("this Ray cluster runs without its dashboard, which Tune needs to free stopped trials: "
                          "start it with ray[default] installed and without --include-dashboard=false")


def run_study(job: TuneJobConfig, *, warmup_steps: int | None = None) -> tuple[list[dict], dict]:
    """Run (or resume) the study; returns its rows and the best one, with the outputs written. `warmup_steps`: an
    --optim.warmup_steps given on the command line (see TuneConfig.warmup_fraction). A study stopped by Ctrl-C
    raises KeyboardInterrupt with how to resume it, and writes nothing: results of a partial study are not its
    results."""
    where = {"--data.path": job.data.path, "--tune.dir": job.tune.dir, **eval_paths(job.eval)}
    for path in where.values():
        storage.check_bucket(path)
    dataset = open_dataset(job.data.path)
    tasks = check_evaluation(job.eval, tokenizer=dataset.tokenizer(), max_len=max(job.model.max_seq_len,
                                                                                     dataset.seq_len))
    for batch in job.tune.batch:  # checked here, as the trainer checks at launch, not trial by trial in the workers
        try:
            check_fits(dataset, global_batch=batch, world=job.ray.num_workers, needs_val=True)
        except ConfigError as exc:
            raise ConfigError(f"--tune.batch {batch}: {exc}") from None
    mark = job.tune.mark_tokens(dataset.seq_len)  # refuses a budget too small for every batch size, before Ray starts
    job.tune.warmup_fraction = warmup_fraction(job.tune, dataset.seq_len, warmup_steps)
    init_ray(log_to_driver=verbose())  # trials' lines would interleave; the study prints a line per trial
    if not verbose():  # a trial's user error is its one line (StudyProgress), not Tune's traceback of it
        from ray.tune.execution import tune_controller

        from trainer.ray_launch import DropUserErrorTraceback

        logging.getLogger(tune_controller.__name__).addFilter(DropUserErrorTraceback())
    check_local_paths(where, shared_fs=job.storage.shared_fs)
    require_state_api()
    tuner = build_tuner(job, seq_len=dataset.seq_len, vocab_size=dataset.vocab_size, tasks=tasks)
    proxy = f" at proxy width {job.tune.proxy_dim}" if job.tune.proxy_dim else ""
    print(f"study in {job.tune.dir}: {mark * job.tune.marks:,} training tokens a trial{proxy}, validated every "
          f"{mark:,}; each trial's curves: tensorboard --logdir {storage.join(job.tune.dir, 'trials')}", flush=True)
    with interruptible():
        results = tuner.fit()
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt(RESUME)
    rows = summarize(results, job.tune, dataset.seq_len)
    best = best_row(rows)
    write_outputs(job, rows, best, vocab_size=dataset.vocab_size)
    return rows, best
