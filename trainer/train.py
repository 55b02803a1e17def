"""The training loop. It needs only torch.distributed: Ray Train, torchrun and a single process run this same code.

One step: this rank's share of the step's rows from the loader (the step is the data cursor), forward/backward per
micro-batch with each token's loss weighted by 1 / (the step's global token count), gradients reduce-scattered and
summed, global-norm clipping, AdamW (which skips a step whose norm is not finite, on device), schedule. The host
waits on the device only at log steps and saves, where metrics are read and a non-finite step stops the run, and at
each step's end until the device is past its backward (whether a rank got a preemption notice: trainer/preemption.py).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from raylm import storage
from raylm.dataset import open_datasets
from raylm.errors import DataError, RaylmError
from trainer import checkpoint, reference
from trainer.checkpoint import Checkpointer
from trainer.data import BatchPlan, StepLoader
from trainer.distributed import Dist, decided_on_rank0, init_distributed, shard_on_meta
from trainer.eval.heldout import flat_metrics, held_out, loss_sums, report
from trainer.eval.suite import metrics as eval_metrics, open_evaluation
from trainer.faults import inject_fault, notice_fault
from trainer.job import JobConfig, check_kernel
from trainer.dpo import Preference, held_out_metrics, step_metrics
from trainer.loss import TokenMean
from trainer.metrics import MetricsLog, device_peak_flops, peak_memory_gib
from trainer.mixture import mix_spec, mixture_order, source_metrics
from trainer.model.attention import attention_kernel
from trainer.model.config import initial_value
from trainer.model.generation import generate
from trainer.optim import build_optimizer, build_scheduler, changed_optim, set_schedule_step
from trainer.parallelize import materialize
from trainer.preemption import Preempted, Preemption

log = logging.getLogger(__name__)


class TrainingDiverged(RaylmError):
    """The loss or gradient norm became non-finite: a user-facing stop, not a crash."""


def build_model(job: JobConfig, d: Dist) -> nn.Module:
    """Meta → AC/compile/FSDP2 → materialise with world-size-independent initial values (left uninitialised when
    the weights will come from init.from_hf)."""
    model = shard_on_meta(job.model, d, job.parallel)
    if job.init.from_hf:
        model.to_empty(device=d.device)  # every weight comes from the folder or the run's checkpoint: nothing to init
    else:
        materialize(model, device=d.device,
                    initial_value=lambda name, shape: initial_value(name, shape, job.model, job.train.seed))
    model.init_buffers()
    return model


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Global gradient norm over all shards (and clip to max_norm if > 0)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_([p for p in model.parameters() if p.grad is not None], max_norm, norm)
    return norm


def train_step(model, optimizer, micro_batches, *, grad_clip: float, aux_weight: float, global_batch: int,
               objective: TokenMean | Preference = TokenMean(), sync_every_micro_batch: bool = True,
               after_backward: Callable[[int], None] | None = None,
               before_update: Callable[[], None] | None = None, preemption: Preemption | None = None) -> tuple:
    """One optimizer step over this rank's micro-batches; returns (this rank's part of the step's mean loss, grad
    norm, whether the norm is finite) as device tensors, with no host sync.

    Each token's loss is divided by the step's global token count (a preference pair's by the step's global pair
    count: `objective`) and FSDP sums the gradients (parallelize sets its divide factor to 1), so the update is the
    same on any world size. By default each micro-batch's gradients are reduce-scattered as its backward ends, so
    only sharded gradients are ever kept; without
    `sync_every_micro_batch` FSDP accumulates full unsharded gradients and reduces once per step. A step whose
    gradient norm is not finite makes no update: the fused AdamW skips it on device (`found_inf`).
    `before_update` runs just before the parameters change (a checkpoint's copy of them must be done by then);
    `preemption` learns after the last backward whether any rank got a preemption notice."""
    totals = objective.totals(micro_batches)
    total = torch.zeros((), device=micro_batches[0].device)
    for i, batch in enumerate(micro_batches):
        if not sync_every_micro_batch:
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)
        loss, aux = objective.loss(model, batch, totals)
        (loss + aux_weight * aux * (len(batch) / global_batch)).backward()
        total += loss.detach()
        if after_backward is not None:
            after_backward(i)
    if preemption is not None:
        preemption.exchange()  # as late as a notice can still save this step, with the update left to queue
    norm = clip_grad_norm(model, grad_clip)
    finite = torch.isfinite(norm)
    optimizer.found_inf = (~finite).float()  # read by the fused AdamW kernel: no update, no step count
    if before_update is not None:
        before_update()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total, norm, finite


def resolve_model(job: JobConfig, dataset) -> None:
    """The dataset decides the vocabulary, or with init.from_hf the folder's config.json decides the architecture
    (and a dataset made with another tokenizer than the folder's, or with more tokens than the model's embedding
    rows, is refused); the context must hold the dataset's sequences. The same on the driver and on every worker."""
    if job.init.from_hf:
        from trainer.hf import model_config_from_hf, read_config

        source = job.init.from_hf
        job.model = model_config_from_hf(read_config(source), source, rest=job.model)
        check_tokenizer(dataset, source)
        if dataset.vocab_size > job.model.vocab_size:
            raise DataError(f"dataset {dataset.directory} has a {dataset.vocab_size}-token tokenizer but init.from_hf="
                            f"{source} has vocab_size {job.model.vocab_size}; tokenize the data with the model's own "
                            f"tokenizer (python -m dataprep --tokenizer {source} ...)")
    else:
        job.model.vocab_size = dataset.vocab_size
    job.model.max_seq_len = max(job.model.max_seq_len, dataset.seq_len)
    job.model.eos_id = dataset.tokenizer().eos_id  # where documents end, for model.doc_mask


def check_tokenizer(dataset, source: str) -> None:
    """Refuse data the model of init.from_hf cannot read: made with another tokenizer than the folder's
    (`trainer.weights.check_data_tokenizer`), or in another format than the one the model was trained in: documents
    that start with BOS for a model whose tokenizer adds it (Llama 3), without for one whose tokenizer does not. A
    folder without a tokenizer says nothing (only its vocab_size is checked, by resolve_model)."""
    from trainer.weights import check_data_tokenizer, tokenizer_in

    tokenizer = tokenizer_in(source)
    if tokenizer is None:
        return
    check_data_tokenizer(dataset, source, tokenizer, option="--init.from_hf")
    expects = tokenizer.bos_first
    if expects != dataset.bos:
        raise DataError(f"dataset {dataset.directory} was made with --bos {'on' if dataset.bos else 'off'} but "
                        f"init.from_hf={source} was trained with documents {'starting with' if expects else 'without'}"
                        f" BOS; make the data again with python -m dataprep --tokenizer {source} --bos "
                        f"{'on' if expects else 'off'} ...")


def starting_checkpoint(job: JobConfig) -> tuple[str, bool] | None:
    """(path, own) of the committed checkpoint a run starts from: RUN_DIR's newest (own), else that of
    checkpoint.resume_from; None for a run from init.from_hf or from initial values."""
    own = checkpoint.latest_committed(job.run.dir)
    if own is not None:
        return own, True
    return (checkpoint.resolve(job.checkpoint.resume_from), False) if job.checkpoint.resume_from else None


def check_checkpoint(job: JobConfig, dataset, path: str, *, own: bool, identity: dict) -> dict:
    """The checkpoint's train state, once it is known to fit this run: a checkpoint of checkpoint.resume_from was
    trained on data of the same tokenizer (`trainer.weights.check_data_tokenizer`; its run directory keeps that
    tokenizer), and `checkpoint.check_continues` passes (for a warm start, on the model alone). On the driver
    before any worker or directory is made, and on every rank as it loads."""
    from trainer.weights import check_data_tokenizer, tokenizer_in

    state = checkpoint.read_train_state(path)
    weights_only = job.checkpoint.load_weights_only and not own
    if not own:
        run_dir = checkpoint.run_dir_of(path)
        recorded = state.get("identity", {}).get("dataset tokenizer sha256")
        if recorded != dataset.manifest["tokenizer"]["sha256"]:
            check_data_tokenizer(dataset, run_dir, tokenizer_in(run_dir), recorded_sha256=recorded,
                                 option="--checkpoint.resume_from")
    checkpoint.check_continues(state, identity, path, own=own, weights_only=weights_only)
    return state


class Trainer:
    """Holds what the loop needs, so the loop itself stays short. `report(metrics, checkpoint)` is called on every rank
    at each log step (Ray Train requires every worker to report); `checkpoint` is the path of a checkpoint committed
    since the last report, on rank 0 only."""

    def __init__(self, job: JobConfig, *, report: Callable[[dict, str | None], None] | None = None,
                 lease: str | None = None, tasks: list | None = None):
        self.job, self.report = job, report
        self.d = init_distributed(job.train.device)
        check_kernel(job, self.d.device.type)
        self.dataset = open_datasets(job.data.path)
        resolve_model(job, self.dataset)
        self.plan = BatchPlan(job.train.global_batch, job.train.micro_batch, self.d.world)
        torch.manual_seed(job.train.seed)
        self.model = build_model(job, self.d)
        self.optimizer = build_optimizer(self.model, optim=job.optim, width_mult=job.model.width_mult)
        self.scheduler = build_scheduler(self.optimizer, optim=job.optim, total_steps=job.train.steps)
        self.ckpt = Checkpointer(job.run.dir, job.checkpoint, rank=self.d.rank, device=self.d.device, lease=lease)
        self.preemption = Preemption(self.d.device, grace_s=job.checkpoint.preempt_grace_s)
        self.start_step = self.resume()
        self.objective = Preference(job.dpo) if job.train.objective == "dpo" else TokenMean()
        self.reference_pass: dict = {}
        """This start's reference pass, for its first metrics line: the rows it scored (0: all were stored) and
        its seconds. Empty unless a DPO run starts at step 0."""
        train, val = self.preference_splits() if job.train.objective == "dpo" and job.dpo.needs_reference else \
            (self.dataset.train, self.dataset.val)
        self.mixture = mixture_order(job.data, self.dataset, batch=self.plan.global_batch)
        self.loader = StepLoader(train, plan=self.plan, rank=self.d.rank, seed=job.data.seed, order=self.mixture,
                                 read_ahead=job.data.read_ahead, pin_memory=self.d.device.type == "cuda")
        tokenizer = self.dataset.tokenizer()
        self.val = held_out(self.dataset, split=val, name="val", token_bytes=tokenizer.token_bytes,
                            rows=job.train.eval_rows, seed=job.data.seed, micro_batch=job.train.micro_batch,
                            rank=self.d.rank, world=self.d.world, keep=True) \
            if job.train.eval_rows and len(self.dataset.val) else None
        self.evaluation = open_evaluation(job.eval, tokenizer=tokenizer, max_len=job.model.max_seq_len,
                                          micro_batch=job.train.micro_batch, rank=self.d.rank, world=self.d.world,
                                          keep=True, tasks=tasks)
        self.tokens_per_step = self.plan.global_batch * self.dataset.seq_len
        self.flops_per_token = job.model.flops_per_token(self.dataset.seq_len)
        self.peak_flops = self._mean_over_ranks(device_peak_flops(self.d.device))
        self.nonfinite = torch.full((2,), -1.0, dtype=torch.float64, device=self.d.device)
        """(first step whose gradient norm was not finite, that norm), -1 while none: kept on device, read at log
        steps and before saves, so no step waits on the host."""
        self.sink = MetricsLog(job.run.dir, start_step=self.start_step) if self.d.rank == 0 else None
        if self.sink:  # a resumed run (the usual case after a preemption) is checked before its first step
            self.preemption.check_grace(self.sink.last("step_time_s"), self.sink.last("checkpoint_save_s"),
                                        measured_by=f"the previous run in {job.run.dir}")
        if self.d.rank == 0:
            log.info("model %.1fM params (%.1fM active), %d workers x %d micro-batches of <= %d, %s tokens/step, "
                     "peak %.0f GFLOP/s per worker (%d threads)", job.model.num_params() / 1e6,
                     job.model.num_params(active=True) / 1e6, self.d.world, self.plan.grad_accum, self.plan.micro_batch,
                     f"{self.tokens_per_step:,}", self.peak_flops / 1e9, torch.get_num_threads())
            if len(self.dataset.train.shape) > 1:  # rows of packed examples: block-causal attention
                log.info("attention: %s for packed examples (model.attention=%s on %s)",
                         attention_kernel(job.model.attention, self.d.device), job.model.attention, self.d.device.type)

    def preference_splits(self) -> tuple[reference.WithReference, reference.WithReference]:
        """The train and val splits with their reference log-probs, scored now by a run at step 0 where they are
        not stored yet (the weights just loaded are the reference); a run past step 0 needs them complete."""
        where = reference.directory(self.job)
        expected = decided_on_rank0(lambda: reference.identity(self.job, self.dataset), rank=self.d.rank)
        if self.start_step == 0:
            t0 = time.perf_counter()
            rows = reference.compute(self.model, self.dataset, where, expected=expected,
                                     micro_batch=self.job.train.micro_batch, rank=self.d.rank, world=self.d.world,
                                     device=self.d.device)
            self.reference_pass = {"reference_rows": rows, "reference_s": time.perf_counter() - t0}
        else:
            decided_on_rank0(lambda: reference.check_complete(where, self.dataset, expected), rank=self.d.rank)
        positions = self.dataset.train.shape[-1]
        return tuple(reference.WithReference(getattr(self.dataset, split), reference.Reference(where, split, positions))
                     for split in reference.SPLITS)

    def _verified_start(self) -> tuple[str, bool] | None:
        found = starting_checkpoint(self.job)
        if found is not None:
            checkpoint.verify(found[0])
        return found

    def resume(self) -> int:
        """Load the run's newest committed checkpoint (or, when the run has none, checkpoint.resume_from or the weights
        of init.from_hf); returns the step to continue from. Rank 0 picks the checkpoint and checks its shards
        (`checkpoint.verify`: one request per shard, made once rather than by every rank), so every rank loads the
        same one or raises the same error."""
        choice = decided_on_rank0(self._verified_start, rank=self.d.rank)
        if choice is None:
            return self.init_from_hf() if self.job.init.from_hf else 0
        path, own = choice
        warm_start = self.job.checkpoint.load_weights_only and not own
        state = check_checkpoint(self.job, self.dataset, path, own=own, identity=self.identity())
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        checkpoint.load(path, self.model, None if warm_start else self.optimizer, verified=True)
        if warm_start:
            if self.d.rank == 0:
                log.info("warm start from the weights of %s", path)
            return 0
        step = state["step"]
        for group, values in zip(self.optimizer.param_groups, configured):
            group.update(values)  # this run's --optim.* values, not the checkpoint's
        set_schedule_step(self.scheduler, step)
        torch.set_rng_state(torch.tensor(bytearray.fromhex(state["rng"]), dtype=torch.uint8, device="cpu"))
        if self.d.rank == 0:
            log.info("resumed from %s at step %d (saved by %d workers, now %d)", path, step, state["world"],
                     self.d.world)
            for key, (old, new) in changed_optim(state.get("optim"), self.job.optim).items():
                log.warning("optim.%s is %s in this run, %s in the checkpoint: %s applies from step %d", key, new,
                            old, new, step + 1)
        return step

    def init_from_hf(self) -> int:
        """Step 0 from the weights of init.from_hf (the optimizer stays fresh): each rank reads only its shards."""
        from trainer.hf import load_hf_weights

        source = self.job.init.from_hf
        read = load_hf_weights(self.model, source)
        self.model.init_buffers()
        if self.d.rank == 0:
            log.info("initialised from Hugging Face %s (%.1fM params, %.1f MB read by this rank)", source,
                     self.job.model.num_params() / 1e6, read.total / 1e6)
        return 0

    def identity(self) -> dict:
        return checkpoint.run_identity(self.job.model, self.dataset, data_seed=self.job.data.seed,
                                       global_batch=self.plan.global_batch, mix=mix_spec(self.job.data))

    def train_state(self, step: int) -> dict:
        return {"step": step, "tokens": step * self.tokens_per_step, "world": self.d.world,
                "rng": torch.get_rng_state().numpy().tobytes().hex(), "model": dataclasses.asdict(self.job.model),
                "optim": dataclasses.asdict(self.job.optim), "identity": self.identity()}

    def is_save_step(self, step: int) -> bool:
        every = self.job.checkpoint.every
        return step == self.job.train.steps or (every > 0 and step % every == 0)

    def _mean_over_ranks(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.d.device)
        dist.all_reduce(t)
        return t.item() / self.d.world

    def fit(self) -> list[dict]:
        history = [self.initial_eval()] if self.start_step == 0 and (self.val or self.evaluation) else []
        window, last_logged = time.perf_counter(), self.start_step
        window_loss = torch.zeros((), device=self.d.device)  # summed on device: no host sync between log steps
        for step in range(self.start_step, self.job.train.steps):
            batches = [b.to(self.d.device, non_blocking=True) for b in self.loader.batches(step)]
            loss, norm, finite = train_step(
                self.model, self.optimizer, batches, objective=self.objective, grad_clip=self.job.optim.grad_clip,
                aux_weight=self.job.model.aux_loss_weight, global_batch=self.plan.global_batch,
                sync_every_micro_batch=not self.job.parallel.unsharded_grad_accumulation,
                before_update=self.ckpt.wait_staged, preemption=self.preemption,
                after_backward=notice_fault(self.job.fault, run_dir=self.job.run.dir, step=step + 1, rank=self.d.rank))
            self.note_nonfinite(finite, norm, step + 1)
            window_loss += loss
            lr = self.scheduler.get_last_lr()[0]  # the lr this step's update used (a host float: no sync)
            self.scheduler.step()
            done = step + 1
            preempted = self.preemption.agreed() and done < self.job.train.steps
            if self.is_save_step(done) or preempted:
                self.stop_if_diverged()  # never save the state after a skipped, non-finite step
                self.ckpt.save(done, self.model, self.optimizer, self.train_state(done))
            if done % self.job.train.log_every == 0 or self.is_eval_step(done) or preempted:
                steps = done - last_logged  # a preempted run logs its last, shorter window too
                history.append(self.log_step(done, window_loss / steps, norm, time.perf_counter() - window, steps,
                                             lr=lr, last=preempted or done == self.job.train.steps))
                window, last_logged = time.perf_counter(), done
                window_loss.zero_()
            if preempted:
                self.stop_for_preemption(done)
            inject_fault(self.job.fault, run_dir=self.job.run.dir, step=done, rank=self.d.rank)
        self.loader.close()
        return history

    def stop_for_preemption(self, step: int) -> None:
        """Wait for the commit of the step's checkpoint, then stop every rank: Ray restarts the run from it."""
        self.ckpt.finish()
        since = self.preemption.seconds_since_notice()
        if since is not None:  # the rank that got the notice
            log.warning("preemption notice: checkpoint at step %d committed %.1fs after it (grace %gs)", step, since,
                        self.job.checkpoint.preempt_grace_s)
        raise Preempted(f"preempted: stopped at step {step} with its checkpoint committed")

    def note_nonfinite(self, finite: torch.Tensor, norm: torch.Tensor, step: int) -> None:
        first = (~finite) & (self.nonfinite[0] < 0)
        self.nonfinite[0] = torch.where(first, float(step), self.nonfinite[0])
        self.nonfinite[1] = torch.where(first, norm.double(), self.nonfinite[1])

    def stop_if_diverged(self) -> None:
        step, norm = self.nonfinite.tolist()
        if step >= 0:
            raise TrainingDiverged(f"gradient norm is {norm} at step {int(step)} (that update was skipped); lower "
                                   "--optim.lr, raise --optim.warmup_steps or check the data")

    def initial_eval(self) -> dict:
        """The evaluation of the untrained model: the baseline the curves start from."""
        m = {"step": 0, "tokens": 0, **self.evaluate()}
        self.publish(m)
        return m

    def evaluate(self) -> dict:
        """The validation slice's val_loss, val_ppl and val_bpb (and per source; for preference pairs their DPO loss,
        rewards and log-probs), and [eval]'s datasets and tasks; collective."""
        if isinstance(self.objective, Preference):
            m = held_out_metrics(self.objective, self.model, self.val, self.d.device) if self.val else {}
        else:
            m = flat_metrics("val_", report(self.val, loss_sums(self.model, self.val, self.d.device))) if self.val \
                else {}
        if self.evaluation:
            m |= eval_metrics(self.evaluation.run(self.model, self.d.device))
        return m

    def publish(self, m: dict) -> None:
        """To rank 0's sinks, then to Ray from every rank with the checkpoint committed since the last report (and
        its save's seconds in `m`, read back by a resumed run's `check_grace`; the first also with the reference
        pass of this start)."""
        committed = self.ckpt.take_committed()
        if committed:
            m["checkpoint_save_s"] = self.ckpt.save_seconds
        m |= self.reference_pass
        self.reference_pass = {}
        if self.sink:
            self.sink.write(m)
        if self.report:
            self.report(m, committed if self.d.rank == 0 else None)

    def is_eval_step(self, step: int) -> bool:
        every = self.job.train.eval_every
        return step == self.job.train.steps or (every > 0 and step % every == 0)

    def log_step(self, step: int, loss: torch.Tensor, norm: torch.Tensor, elapsed: float, steps: int, *,
                 lr: float, last: bool) -> dict:
        """Metrics of the `steps` steps since the last log step: `loss` is their mean training loss (one step's loss
        swings far more than the trend it is read for), the rates are over the window, grad_norm is the last step's.
        At the last step (the run's, or a preempted run's) the final checkpoint's commit is waited for first (and
        counted as blocked time), so the last report carries it. Rank 0 checks the preemption grace against the
        step time and the newest save's, from the second window on (the first one's warm-up and compilation are not
        what a step takes)."""
        self.stop_if_diverged()
        dist.all_reduce(loss)  # SUM of each rank's share of the global token-weighted mean
        mean_loss = loss.item()
        if self.job.train.max_loss and not mean_loss <= self.job.train.max_loss:  # `not <=`: NaN too
            raise TrainingDiverged(f"training loss {mean_loss:.4g} at step {step} exceeds train.max_loss="
                                   f"{self.job.train.max_loss:g}; lower --optim.lr or raise --optim.warmup_steps")
        final_wait = self.ckpt.finish() if last else None
        step_time = elapsed / steps
        tokens_per_s = self.tokens_per_step / step_time
        m = {
            "step": step, "loss": mean_loss, "lr": lr, "grad_norm": norm.item(),
            "tokens": step * self.tokens_per_step, "tokens_per_s": tokens_per_s, "step_time_s": step_time,
            "mfu": tokens_per_s * self.flops_per_token / (self.peak_flops * self.d.world), "workers": self.d.world,
            "data_wait_share": self.loader.take_wait() / elapsed, "peak_mem_gib": peak_memory_gib(self.d.device),
            "checkpoint_blocked_s": self.ckpt.take_blocked(),
        }
        stats = self.objective.take_stats() if isinstance(self.objective, Preference) else None
        if stats is not None:
            dist.all_reduce(stats)
            m |= {k: v for k, v in step_metrics(stats).items() if k != "loss"}  # "loss" is the step's, SFT term too
        if self.mixture:  # what the mix consumed: tokens and epochs of each source
            m |= source_metrics(self.mixture, step=step, seq_len=self.dataset.seq_len)
        if final_wait is not None:  # part of checkpoint_blocked_s: the last save's write, which a run must finish
            m["checkpoint_final_wait_s"] = final_wait
        if self.is_eval_step(step):
            m |= self.evaluate()
        self.publish(m)
        if self.sink and step - steps > self.start_step:
            self.preemption.check_grace(step_time, self.ckpt.save_seconds, measured_by="this run")
        return m

    def sample(self) -> str | None:
        """A seeded continuation of the configured prompt; every rank runs it (FSDP forwards are collective)."""
        prompt = self.job.train.sample_prompt
        if not prompt:
            return None
        tokenizer = self.dataset.tokenizer()
        ids = tokenizer.encode([prompt])[0]
        self.model.eval()
        generator = torch.Generator(device=self.d.device).manual_seed(self.job.train.seed)  # where the logits are
        out = generate(self.model, ids, self.job.train.sample_tokens, self.job.train.sample_temperature, top_k=50,
                       eos_id=tokenizer.eos_id, generator=generator)
        self.model.train()
        return prompt + tokenizer.decode(out[len(ids):])

    def close(self) -> None:
        self.ckpt.close()
        if self.sink:
            self.sink.close()


def write_run_files(job: JobConfig, dataset) -> None:
    """The resolved config, and the tokenizer's files, so a run directory is enough to generate from, chat with or
    export."""
    from raylm.config import dump_toml

    storage.write_bytes(storage.join(job.run.dir, "config.toml"), dump_toml(job).encode())
    for name, data in dataset.tokenizer_bytes().items():
        storage.write_bytes(storage.join(job.run.dir, name), data)


def run(job: JobConfig, *, report: Callable[[dict, str | None], None] | None = None, lease: str | None = None,
        tasks: list | None = None, reference_only: bool = False) -> dict:
    """Train as configured; called on every rank. Returns {"history": metrics of every log step, "sample": text}.
    `lease`: the token of the job's lease on RUN_DIR, checked before each commit; `tasks`: [eval]'s tasks as the
    driver tokenized them (None: each rank tokenizes them); `reference_only`: stop once the reference log-probs of a
    DPO run are stored (`python -m trainer.reference`)."""
    trainer = Trainer(job, report=report, lease=lease, tasks=tasks)
    try:
        if reference_only:
            return {"history": [], "sample": None, **trainer.reference_pass}
        if trainer.d.rank == 0:
            write_run_files(job, trainer.dataset)
        with trainer.preemption:
            history = trainer.fit()
        return {"history": history, "sample": trainer.sample()}
    finally:
        trainer.close()
