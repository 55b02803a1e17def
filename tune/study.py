"""A Ray Tune study over short runs of the trainer: peak lr × global batch (and DPO's β or a source's mix weight),
compared at equal training tokens.

Each trial is a function trainable that runs the trainer under Ray Train (the same code as `python -m trainer`, on
`ray.num_workers` workers) and forwards its log steps to Tune. A trial validates at `tune.marks` equal token counts
whatever its batch size, and ASHA (time in tokens) stops the poor ones at those marks. A trial
whose loss diverges ends as "diverged" instead of failing the study.

Beside lr and batch a study may search DPO's β or one source's data.mix weight (tune.config.Searched), in the lr's
form. Trials are ranked by validation loss, or for DPO by held-out reward accuracy: the DPO loss's scale changes with β,
the sign of a pair's margin does not. DPO trials all start from the same weights, so their reference log-probs are
scored once, before any trial, into tune.dir/reference (or dpo.reference), and every trial reads them there.
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
from raylm.dataset import open_datasets
from raylm.errors import ConfigError, find_user_error
from raylm.paths import option_paths
from raylm.ray_session import check_local_paths, init_ray, verbose
from trainer import reference
from trainer.data import check_fits
from trainer.eval.suite import check_evaluation, eval_paths
from trainer.job import JobConfig
from trainer.mixture import check_epochs, mixture_order
from tune.config import MAX_WARMUP_FRACTION, Searched, TuneConfig, TuneJobConfig, proxy_model

log = logging.getLogger(__name__)

STUDY = "study"


@dataclasses.dataclass(frozen=True)
class Metric:
    """What a study ranks its trials by: the key of the trials' reports, which way is better, its name in
    results.csv (final_<column>, best_<column>) and in the lines printed."""

    key: str
    mode: str
    column: str
    label: str

    def best(self, values: list[float]) -> float:
        return min(values) if self.mode == "min" else max(values)

    @property
    def worst(self) -> float:
        """What a diverged trial reports."""
        return math.inf if self.mode == "min" else -math.inf


VAL_LOSS = Metric("val_loss", "min", "val_loss", "val loss")
REWARD_ACCURACY = Metric("val_rewards/accuracy", "max", "val_reward_accuracy", "val reward accuracy")


def study_metric(job: JobConfig) -> Metric:
    return REWARD_ACCURACY if job.train.objective == "dpo" else VAL_LOSS


def columns(metric: Metric, extras: list[Searched]) -> tuple[str, ...]:
    """results.csv's columns."""
    return ("trial", "lr", *(extra.column for extra in extras), "global_batch", "tokens", f"final_{metric.column}",
            f"best_{metric.column}", "status")


def apply_params(job: JobConfig, params: dict, tune: TuneConfig) -> None:
    """A trial's parameters (lr, batch, and β or a source's mix weight where searched) set in its job; best.toml's
    the same way."""
    job.optim.lr, job.train.global_batch = params["lr"], params["batch"]
    job.dpo.beta = params.get("beta", job.dpo.beta)
    if "mix" in params:
        job.data.mix = {**job.data.mix, tune.mix_source: params["mix"]}


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
    """The training job of one trial: the study's job with the trial's lr, batch (and β), sized to the token
    budget. A DPO trial diverges when its loss is not finite: the DPO loss's scale grows with β, unlike the LM
    loss, which a uniform guess puts at ln(vocabulary)."""
    job, tune = from_dict(JobConfig, study["job"]), TuneConfig(**study["tune"])
    apply_params(job, config, tune)
    if tune.proxy_dim:
        job.model = proxy_model(job.model, tune.proxy_dim)
    job.train.steps, job.train.eval_every = trial_steps(config["batch"], study["seq_len"], tune)
    job.optim.warmup_steps = round(tune.warmup_fraction * job.train.steps)  # the decay spans the rest of its steps
    job.train.log_every = job.checkpoint.every = job.train.eval_every  # every report carries val_loss
    job.train.max_loss = math.inf if job.train.objective == "dpo" else tune.diverged_loss(study["vocab_size"])
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
        ray.tune.report({"tokens": tokens, study_metric(job).key: study_metric(job).worst, "diverged": True,
                         "reason": str(exc)})


class StudyProgress(Callback):
    """raylm's own lines for a study, instead of Tune's status table (whose CPU column counts only what the trials
    hold themselves, nothing: their Ray Train workers reserve the CPUs) and its TensorBoard hint into Ray's session
    directory: a line when a trial starts and one when it ends, with what it reached (or where a Ctrl-C stopped it)."""

    def __init__(self, study: dict):
        self.tune, self.seq_len = TuneConfig(**study["tune"]), study["seq_len"]
        self.metric = study_metric(from_dict(JobConfig, study["job"]))

    running = frozenset()
    """Ids of the trials started and not ended. A class default: Tune gives a resumed study back the callbacks it
    pickled when the study began, which for a study begun by an earlier raylm lack it (and `metric`)."""
    metric = VAL_LOSS

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
        print(f"trial {trial}: {status} at {last.get('tokens', 0):,} tokens, {self.metric.label} "
              f"{last.get(self.metric.key, math.nan):.4f}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running = self.running - {trial.trial_id}
        user_error = trial_user_error(trial)  # e.g. workers that found no room to start
        why = f": {user_error}" if user_error else f"; its logs are under {trial.path}"
        print(f"trial {trial}: failed{why}", flush=True)


def trial_name(trial) -> str:
    """A trial's name, and its directory's (in Tune's study and under trials/): whole and short, where Tune's own
    (trainable, id, then its parameters cut at 130 characters and a date) is cut mid-word in a table."""
    extras = "".join(f"-{key}{trial.config[key]:.3g}" for key in SEARCHED_KEYS if key in trial.config)
    return f"{trial.trial_id}-lr{trial.config['lr']:.2e}-b{trial.config['batch']}{extras}"


SEARCHED_KEYS = ("beta", "mix")
"""Parameters a trial may have beside lr and batch (TuneConfig.extras)."""


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


def study_spec(job: TuneJobConfig, *, seq_len: int, vocab_size: int, tasks: list) -> dict:
    """What every trial is given besides its parameters (`trial_job` makes its job from them). `tasks`: [eval]'s
    tasks as the study tokenized them."""
    return {"job": to_dict(job), "tune": dataclasses.asdict(job.tune), "seq_len": seq_len, "vocab_size": vocab_size,
            "trials_dir": storage.join(job.tune.dir, "trials"), "tasks": tasks}


def build_tuner(job: TuneJobConfig, spec: dict):
    """A new Tuner, or the restored one of an interrupted study (`tune.resume`); `spec`: `study_spec`'s."""
    from ray import tune as raytune
    from ray.tune.schedulers import ASHAScheduler

    cfg = job.tune
    fs, path, study = study_path(cfg)
    trainable = raytune.with_resources(raytune.with_parameters(run_trial, study=spec), TRIAL_DRIVER)
    exists = raytune.Tuner.can_restore(study, storage_filesystem=fs)
    if not verbose():  # Tune's newer console output prints its header and a TensorBoard hint even when silent
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    if cfg.resume:
        if not exists:
            raise ConfigError(f"--tune.resume: {cfg.dir} holds no study to resume; drop --tune.resume to start one")
        return raytune.Tuner.restore(study, trainable, resume_unfinished=True, storage_filesystem=fs)
    if exists:
        raise ConfigError(f"{cfg.dir} already holds a study: add --tune.resume to continue it, or pick another --tune.dir")
    searched = {"lr": cfg.lr_values, "batch": cfg.batch, **{extra.key: extra.values for extra in cfg.extras}}
    param_space = {name: raytune.grid_search(list(values)) if cfg.grid else
                   raytune.choice(values) if name == "batch" else raytune.loguniform(*values)
                   for name, values in searched.items()}
    mark_tokens = cfg.mark_tokens(spec["seq_len"])
    metric = study_metric(job)
    return raytune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=raytune.TuneConfig(
            metric=metric.key, mode=metric.mode, num_samples=1 if cfg.grid else cfg.samples,  # deterministic
            trial_name_creator=trial_name, trial_dirname_creator=trial_name,
            search_alg=search_algorithm(cfg, cfg.max_concurrent or concurrent_trials(job)),
            scheduler=ASHAScheduler(time_attr="tokens", max_t=mark_tokens * cfg.marks,
                                    grace_period=mark_tokens * cfg.grace_marks, reduction_factor=cfg.reduction_factor),
        ),
        run_config=raytune.RunConfig(name=STUDY, storage_path=path, storage_filesystem=fs,
                                     **({} if verbose() else {"verbose": 0, "callbacks": [StudyProgress(spec)]})),
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


def summarize(results, cfg: TuneConfig, seq_len: int, metric: Metric) -> list[dict]:
    """One row per trial (with its validation curve of `metric`) from Tune's results."""
    rows = []
    for result in results:
        config, last = result.config, result.metrics or {}
        frame = result.metrics_dataframe
        curve = [] if frame is None or metric.key not in frame else [
            (int(t), float(v)) for t, v in zip(frame["tokens"], frame[metric.key]) if math.isfinite(v)]
        planned = trial_steps(config["batch"], seq_len, cfg)[0] * config["batch"] * seq_len
        if last.get("diverged"):
            status = "diverged"
        elif result.error is not None:
            status = "error"
        else:
            status = "completed" if last.get("tokens", 0) >= planned else "stopped early"
        values = [v for _, v in curve]
        rows.append({"trial": posixpath.basename(result.path), "lr": config["lr"], "global_batch": config["batch"],
                     **{key: config[key] for key in SEARCHED_KEYS if key in config}, "tokens": int(last.get("tokens", 0)),
                     "final": values[-1] if values else math.nan,
                     "best": metric.best(values) if values else math.nan, "status": status, "curve": curve})
    return sorted(rows, key=lambda r: r["trial"])


def best_row(rows: list[dict], metric: Metric) -> dict:
    """The completed trial with the best final value of `metric` (all completed trials saw the same tokens); of
    equals, the first by name."""
    completed = [r for r in rows if r["status"] == "completed"]
    if not completed:
        raise ConfigError("no trial completed its token budget; widen --tune.lr or lower --tune.budget_tokens")
    return next(r for r in completed if r["final"] == metric.best([r["final"] for r in completed]))


BEST_RUN = "best-run"
"""best.toml's run directory, in the study directory: the next run never lands in an existing run's directory."""


def write_outputs(job: TuneJobConfig, rows: list[dict], best: dict, *, vocab_size: int) -> None:
    """results.csv, results.png and best.toml (the job with the best lr, batch and β, the dataset's vocabulary and
    a run directory of its own) in the study directory."""
    from tune.plot import plot_results

    metric = study_metric(job)
    out = io.StringIO()
    extras = job.tune.extras
    writer = csv.DictWriter(out, fieldnames=columns(metric, extras), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({**r, f"final_{metric.column}": r["final"], f"best_{metric.column}": r["best"],
                      **{extra.column: r[extra.key] for extra in extras}} for r in rows)
    storage.write_bytes(storage.join(job.tune.dir, "results.csv"), out.getvalue().encode())
    storage.write_bytes(storage.join(job.tune.dir, "results.png"), plot_results(rows, best, metric, extras))
    tuned = from_dict(JobConfig, to_dict(job))
    apply_params(tuned, {**best, "batch": best["global_batch"]}, job.tune)
    tuned.model.vocab_size, tuned.run.dir = vocab_size, storage.join(job.tune.dir, BEST_RUN)
    storage.write_bytes(storage.join(job.tune.dir, "best.toml"), (transfer_note(job) + dump_toml(tuned)).encode())


def transfer_note(job: TuneJobConfig) -> str:
    """best.toml's opening comment when the study ran on a proxy."""
    if not job.tune.proxy_dim:
        return ""
    return (f"# optim.lr and train.global_batch are the best of a study at proxy width {job.tune.proxy_dim} "
            f"(same depth, head_dim, data and tokens). This job is for model.dim = {job.model.dim}: under muP "
            f"(model.mup_base_dim = {job.model.mup_base_dim}) the best lr transfers across width.\n")


def format_table(rows: list[dict], best: dict, extras: list[Searched]) -> str:
    """The study's table: a column for each value searched beside lr and batch; final and best are of the study's
    metric."""
    width = max(len("trial"), *(len(r["trial"]) for r in rows))
    heads = "".join(f" {extra.column:>{max(9, len(extra.column))}s}" for extra in extras)
    lines = [f"{'trial':{width}s} {'lr':>9s}{heads} {'batch':>5s} {'tokens':>10s} {'final val':>9s} {'best val':>9s}"
             "  status"]
    for r in rows:
        mark = "  <- best" if r is best else ""
        values = "".join(f" {r[extra.key]:>{max(9, len(extra.column))}.3g}" for extra in extras)
        lines.append(f"{r['trial']:{width}s} {r['lr']:9.2e}{values} {r['global_batch']:5d} {r['tokens']:10,d} "
                     f"{r['final']:9.4f} {r['best']:9.4f}  {r['status']}{mark}")
    return "\n".join(lines)


def check_mixes(job: TuneJobConfig, spec: dict, dataset) -> None:
    """A searched mix weight names a source of the dataset, and the mixes at the ends of its range (or its grid),
    at every batch size, stay within data.max_epochs: refused before any trial, as the trainer refuses at launch."""
    cfg = job.tune
    if not cfg.mix:
        return
    if cfg.mix_source not in dataset.source_names:
        raise ConfigError(f"tune.mix={cfg.mix}: {cfg.mix_source!r} is not a source of the dataset (its sources: "
                          f"{', '.join(dataset.source_names)})")
    weights = next(extra.values for extra in cfg.extras if extra.key == "mix")
    for batch in cfg.batch:
        for weight in weights:
            trial = trial_job({"lr": job.optim.lr, "batch": batch, "mix": weight}, spec, job.tune.dir)
            check_epochs(mixture_order(trial.data, dataset, batch=batch), steps=trial.train.steps,
                         max_epochs=trial.data.max_epochs)


REFERENCE_PASS = "reference-pass"
"""The run directory, in the study directory, of a DPO study's reference pass (its lease and empty metrics)."""


def score_reference(job: JobConfig, dataset) -> None:
    """Score the reference log-probs of the weights every trial starts from (`job`: the pass's), once, before any
    trial: trials side by side would each score them. Reference log-probs already complete (a resumed study, or
    another study's given as --dpo.reference) are read as they are."""
    if job.train.objective != "dpo" or not job.dpo.needs_reference:
        return
    from trainer.ray_launch import launch

    where = reference.directory(job)
    if reference.check_identity(where, reference.identity(job, dataset)) and not reference.missing_parts(where,
                                                                                                          dataset):
        print(f"reference log-probs: reusing {where}", flush=True)
        return
    scored = launch(job, reference_only=True).return_value
    print(f"reference log-probs: {scored['reference_rows']:,} rows scored in {scored['reference_s']:.1f} s into "
          f"{where}, for every trial", flush=True)


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
    if job.train.objective == "dpo" and job.dpo.needs_reference:  # one reference for every trial
        job.dpo.reference = job.dpo.reference or storage.join(job.tune.dir, "reference")
    where = {**option_paths("--data.path", job.data.path), "--tune.dir": job.tune.dir,
             "--dpo.reference": job.dpo.reference, **eval_paths(job.eval)}
    for path in filter(None, where.values()):
        storage.check_bucket(path)
    dataset = open_datasets(job.data.path)
    tasks = check_evaluation(job.eval, tokenizer=dataset.tokenizer(), max_len=max(job.model.max_seq_len,
                                                                                     dataset.seq_len))
    for batch in job.tune.batch:  # checked here, as the trainer checks at launch, not trial by trial in the workers
        try:
            check_fits(dataset, global_batch=batch, world=job.ray.num_workers, needs_val=True)
        except ConfigError as exc:
            raise ConfigError(f"--tune.batch {batch}: {exc}") from None
    mark = job.tune.mark_tokens(dataset.seq_len)  # refuses a budget too small for every batch size, before Ray starts
    job.tune.warmup_fraction = warmup_fraction(job.tune, dataset.seq_len, warmup_steps)
    spec = study_spec(job, seq_len=dataset.seq_len, vocab_size=dataset.vocab_size, tasks=tasks)
    reference_job = trial_job({"lr": job.optim.lr, "batch": max(job.tune.batch)}, spec,
                              storage.join(job.tune.dir, REFERENCE_PASS))  # the weights every trial starts from
    reference.check_job(reference_job, dataset)
    check_mixes(job, spec, dataset)
    init_ray(log_to_driver=verbose())  # trials' lines would interleave; the study prints a line per trial
    if not verbose():  # a trial's user error is its one line (StudyProgress), not Tune's traceback of it
        from ray.tune.execution import tune_controller

        from trainer.ray_launch import DropUserErrorTraceback

        logging.getLogger(tune_controller.__name__).addFilter(DropUserErrorTraceback())
    check_local_paths(where, shared_fs=job.storage.shared_fs)
    require_state_api()
    tuner = build_tuner(job, spec)
    proxy = f" at proxy width {job.tune.proxy_dim}" if job.tune.proxy_dim else ""
    print(f"study in {job.tune.dir}: {mark * job.tune.marks:,} training tokens a trial{proxy}, validated every "
          f"{mark:,}; each trial's curves: tensorboard --logdir {storage.join(job.tune.dir, 'trials')}", flush=True)
    score_reference(reference_job, dataset)
    with interruptible():
        results = tuner.fit()
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt(RESUME)
    metric = study_metric(job)
    rows = summarize(results, job.tune, dataset.seq_len, metric)
    best = best_row(rows, metric)
    write_outputs(job, rows, best, vocab_size=dataset.vocab_size)
    return rows, best
