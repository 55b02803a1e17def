"""Reference log-probs for preference tuning: one pass of the run's initial weights over the dataset, stored once.

    python -m trainer.reference --config X.toml --train.objective=dpo --data.path PAIRS --run.dir RUN_DIR \
        (--checkpoint.resume_from=SFT_RUN --checkpoint.load_weights_only=true | --init.from_hf=HF_DIR) [--no-ray]

DPO compares the policy's log-prob of each reply with the reference model's (the weights the run starts from).
Rather than keep a second model in memory, a DPO run's first start (or `python -m trainer.reference`) scores every
reply of the train and val splits once and stores the sums beside the run: parts of PART_ROWS rows, each an .npy of
(rows, highest example id + 1) float64, written whole by one rank. The pass is sharded like training (FSDP2, every
rank's forwards together), a part's rows are scored in the same micro-batches on any world size, and a pass cut
short leaves its finished parts: the next start scores only the missing ones. `identity.json` names the weights
and the dataset it was made from; a run of other weights or data is refused before it computes anything, and a
re-run or a Tune trial of the same ones reads the parts as they are.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
import time
from functools import lru_cache

import numpy as np
import torch
import torch.distributed as dist

from raylm import storage
from raylm.errors import DataError
from trainer.distributed import decided_on_rank0
from trainer.dpo import example_logps
from trainer.loss import forward_rows

log = logging.getLogger(__name__)

PART_ROWS = 256
SPLITS = ("train", "val")


def directory(job) -> str:
    return job.dpo.reference or storage.join(job.run.dir, "reference")


def identity(job, dataset) -> dict:
    """What the reference log-probs depend on: the initial weights (as the config names them) and the dataset."""
    if job.init.from_hf:
        config = storage.read_bytes(storage.join(job.init.from_hf, "config.json"))
        weights = {"init.from_hf": job.init.from_hf, "config.json sha256": hashlib.sha256(config).hexdigest()}
    elif job.checkpoint.resume_from:
        from trainer.checkpoint import resolve

        weights = {"checkpoint.resume_from": resolve(job.checkpoint.resume_from)}
    else:
        weights = {"initial values": dataclasses.asdict(job.model), "train.seed": job.train.seed}
    manifest = json.dumps(dataset.manifest, sort_keys=True).encode()
    return {"weights": weights, "dataset": dataset.directory,
            "dataset manifest sha256": hashlib.sha256(manifest).hexdigest()}


def check_identity(where: str, expected: dict) -> bool:
    """Whether `where` already holds reference log-probs (of these weights and data: others are refused)."""
    path = storage.join(where, "identity.json")
    if not storage.exists(path):
        return False
    found = json.loads(storage.read_bytes(path))
    for key in ("weights", "dataset manifest sha256"):
        if found.get(key) != expected[key]:
            raise DataError(f"{where} holds reference log-probs of other {key.split()[0]} ({found.get(key)}, this run:"
                            f" {expected[key]}); pass another --dpo.reference or delete it")
    return True


def check_job(job, dataset) -> None:
    """On the driver, before any worker starts: preference data is trained with train.objective=dpo and only it, and
    a reference stored where this run reads it is of this run's weights and data."""
    if dataset.pairs and job.train.objective != "dpo":
        raise DataError(f"dataset {dataset.directory} holds preference pairs; train on it with --train.objective=dpo")
    if not dataset.pairs and job.train.objective == "dpo":
        raise DataError(f"--train.objective=dpo needs preference pairs, and dataset {dataset.directory} has none; "
                        "make them with python -m dataprep --format preference")
    if job.train.objective == "dpo" and job.dpo.needs_reference:
        check_identity(directory(job), identity(job, dataset))


def part_path(where: str, split: str, part: int) -> str:
    return storage.join(where, f"{split}-{part:05d}.npy")


def parts(n_rows: int) -> int:
    return math.ceil(n_rows / PART_ROWS)


def missing_parts(where: str, dataset) -> list[tuple[str, int]]:
    """The parts not written yet (all of them where no pass has started: identity.json is written first)."""
    started = storage.exists(storage.join(where, "identity.json"))
    have = {f.path.rsplit("/", 1)[-1] for f in storage.list_files(where)} if started else set()
    return [(split, part) for split in SPLITS for part in range(parts(len(getattr(dataset, split))))
            if f"{split}-{part:05d}.npy" not in have]


@torch.no_grad()
def part_logps(model, split, part: int | None, *, shape: tuple, micro_batch: int,
               device: torch.device) -> np.ndarray | None:
    """(rows, highest example id + 1) summed reply log-probs of one part's rows; None for no part (this rank runs
    the round's forwards on empty batches). Always ceil(PART_ROWS / micro_batch) forwards: FSDP's are collective."""
    indices = np.arange(part * PART_ROWS, min((part + 1) * PART_ROWS, len(split))) if part is not None else []
    values, width = [], 1
    for start in range(0, PART_ROWS, micro_batch):
        chosen = indices[start:start + micro_batch]
        rows = torch.from_numpy(split.rows(chosen).astype(np.int64)) if len(chosen) else \
            torch.zeros((0, *shape), dtype=torch.int64, device=device)
        rows = rows.to(device)
        logits, _, _, _ = forward_rows(model, rows)
        if len(chosen):
            values.append(example_logps(logits, rows)[0].cpu().numpy())
            width = max(width, int(rows[:, 1].max()) + 1)
    return np.concatenate(values)[:, :width] if part is not None else None


def compute(model, dataset, where: str, *, expected: dict, micro_batch: int, rank: int, world: int,
            device: torch.device) -> int:
    """Score the parts `where` lacks, rank r taking the r-th of each round of `world`; returns the rows scored.
    Collective: every rank calls it."""
    def plan():
        check_identity(where, expected)
        return missing_parts(where, dataset)

    missing = decided_on_rank0(plan, rank=rank)
    if rank == 0 and missing:
        storage.write_bytes(storage.join(where, "identity.json"), json.dumps(expected, indent=1).encode())
    model.eval()
    scored, t0 = 0, time.perf_counter()
    for first in range(0, len(missing), world):
        mine = missing[first + rank] if first + rank < len(missing) else None
        values = part_logps(model, getattr(dataset, mine[0]) if mine else None, mine[1] if mine else None,
                            shape=dataset.train.shape, micro_batch=micro_batch, device=device)
        if mine:
            buffer = io.BytesIO()
            np.save(buffer, values)
            storage.write_bytes(part_path(where, *mine), buffer.getvalue())
            scored += len(values)
    model.train()
    total = torch.tensor([scored], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    if rank == 0:
        if missing:
            log.info("reference log-probs: %d rows scored in %.1fs (%d parts) -> %s", int(total.item()),
                     time.perf_counter() - t0, len(missing), where)
        else:
            log.info("reference log-probs: reusing %s", where)
    return int(total.item())


def check_complete(where: str, dataset, expected: dict) -> None:
    """A run past step 0 reads the reference its first start stored: of its weights and data, and whole."""
    if not check_identity(where, expected) or missing_parts(where, dataset):
        raise DataError(f"the reference log-probs in {where} are missing or incomplete, and this run is past step 0 "
                        "(its weights are no longer the reference); point --dpo.reference at the ones its first "
                        "start computed, or start a new --run.dir")


class Reference:
    """Reads the stored log-probs of any rows of a split; parts are loaded as needed and a few kept."""

    def __init__(self, where: str, split: str, positions: int):
        self.where, self.split, self.positions = where, split, positions
        self._part = lru_cache(maxsize=8)(self._load)

    def _load(self, part: int) -> np.ndarray:
        path = part_path(self.where, self.split, part)
        if not storage.exists(path):
            raise DataError(f"reference log-probs {path} are missing: the pass that makes them did not finish; run "
                            "the job from step 0 again (or python -m trainer.reference) to complete it")
        return np.load(io.BytesIO(storage.read_bytes(path)))

    def values(self, indices: np.ndarray) -> np.ndarray:
        """(len(indices), positions) float64: each row's reference log-prob of example id e at column e."""
        out = np.zeros((len(indices), self.positions))
        for i, row in enumerate(np.asarray(indices)):
            part = self._part(int(row) // PART_ROWS)[int(row) % PART_ROWS]
            out[i, :len(part)] = part
        return out


class WithReference:
    """A split of preference rows whose rows carry a fourth plane: the reference log-probs (float64 bits) of their
    examples, read with them (`trainer.dpo.reference_plane`)."""

    def __init__(self, split, reference: Reference):
        self.split, self.reference = split, reference
        self.shape = (split.shape[0] + 1, split.shape[1])

    def __len__(self) -> int:
        return len(self.split)

    def row_sources(self):
        return self.split.row_sources()

    def rows(self, indices) -> np.ndarray:
        rows = self.split.rows(indices).astype(np.int64)
        plane = self.reference.values(np.asarray(indices)).view(np.int64)
        return np.concatenate([rows, plane[:, None, :]], axis=1)


def main(argv: list[str]) -> int:
    from trainer.__main__ import main as trainer_main

    return trainer_main(argv, reference_only=True)


if __name__ == "__main__":
    import sys

    from raylm.cli import run_cli

    sys.exit(run_cli(main))
