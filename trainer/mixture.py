"""Data mixtures: which source each row of a step comes from, and which row of that source, as a function of
(seed, step, position) alone.

A mixture is a list of phases, each from a step on with weights per source (`--data.mix`, `--data.mix_schedule`).
Within a phase, step t holds exactly floor(B·w) or ceil(B·w) rows of each source (B the global batch): every step is a
block whose shares are within 1/B of the weights. Which sources get the extra row at which step follows a table of
one period (PERIOD steps) built once per phase by a largest-deficit rule, so that over the period each source gets
its weight's rows to the row and, at every step of it, is within about one row of its due; a source's rows before
any step are a sum over phases and periods, O(phases). A step's slots are dealt to sources in that count and
shuffled by a permutation keyed by (seed, step); each source walks its own seeded permutation of its rows, epoch
after epoch, from its running count. Nothing here grows with the rows: a source is a list of row ranges (its
shards), a position is mapped in O(log shards).

Rank r of W reads its contiguous share of the step's B rows, as for a single dataset (trainer/data.py): any W sees
the same global batch, and a resume continues from the step alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from raylm.config import coerce
from raylm.errors import ConfigError
from raylm.permutation import Permutation
from trainer.data import EpochOrder

MIX_STREAM = 2
"""Seed stream of a mixture's permutations (trainer/data.py's train and val streams are 0 and 1): SLOTS keys a step's
shuffle of its slots, ROWS a source's epoch."""
SLOTS, ROWS = 0, 1

PERIOD = 4096
"""Steps in one apportionment table: over a period every source gets its weight's share to the row."""


def weights_of(mix: dict[str, float], names: list[str], *, flag: str = "--data.mix",
               groups: dict[str, list[int]] | None = None, rows: list[int] | None = None) -> np.ndarray:
    """{name: weight} → weights summing to 1 in the order of `names`; a source left out has weight 0. A name in
    `groups` (a dataset of several sources) shares its weight among its sources by their `rows`."""
    groups = groups or {}
    unknown = [name for name in mix if name not in names and name not in groups]
    if unknown:
        known = ", ".join([*names, *groups])
        raise ConfigError(f"{flag}: {unknown[0]!r} is not a source of this dataset (its sources: {known})")
    both = next((g for g in mix if g in groups and any(names[s] in mix for s in groups[g])), None)
    if both:
        raise ConfigError(f"{flag}: {both} is weighed as a whole and by its sources: give one")
    bad = [name for name, weight in mix.items() if not 0 <= weight < math.inf]
    if bad:
        raise ConfigError(f"{flag}: the weight of {bad[0]} must be a finite number >= 0, got {mix[bad[0]]}")
    total = sum(mix.values())
    if total <= 0:
        raise ConfigError(f"{flag}: give at least one source a weight > 0")
    weights = np.array([mix.get(name, 0.0) for name in names])
    for group in set(mix) & set(groups):
        members = groups[group]
        sizes = np.array([rows[s] for s in members], dtype=np.float64)
        weights[members] = mix[group] * sizes / max(sizes.sum(), 1)
    return weights / total


def parse_schedule(schedule: str | list[dict[str, float]]) -> list[tuple[int, dict[str, float]]]:
    """`STEP:name=w,...; STEP:...`, or TOML's [{step = S, name = w, ...}, ...] → [(first step, {name: weight})],
    from step 0, steps increasing."""
    phases = []
    for part in schedule if isinstance(schedule, list) else filter(None, (p.strip() for p in schedule.split(";"))):
        if isinstance(part, dict):
            step, mix = part.get("step", -1.0), {name: w for name, w in part.items() if name != "step"}
            if not (step >= 0 and step == int(step)):
                raise ConfigError(f"data.mix_schedule: {part} needs a whole step >= 0 (e.g. {{step = 0, web = 0.7}})")
        else:
            step, sep, mix = part.partition(":")
            if not sep or not step.strip().isdigit():
                raise ConfigError(f"--data.mix_schedule: {part!r} is not STEP:NAME=WEIGHT,... (e.g. 0:web=0.7,code=0.3)")
        phases.append((int(step), coerce(mix, dict[str, float], f"--data.mix_schedule's step {int(step)}")))
    if not phases or phases[0][0] != 0:
        raise ConfigError("--data.mix_schedule must start at step 0 (e.g. '0:web=0.7,code=0.3; 9000:web=0.3,math=0.7')")
    if any(b[0] <= a[0] for a, b in zip(phases, phases[1:])):
        raise ConfigError(f"--data.mix_schedule's steps must increase: {[step for step, _ in phases]}")
    return phases


def largest_remainder(quotas: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to `total`, each the floor or the ceiling of its quota (quotas sum to `total`): the
    largest fractional parts get the ceiling, ties to the lower index."""
    counts = np.floor(quotas).astype(np.int64)
    short = total - int(counts.sum())
    order = sorted(range(len(quotas)), key=lambda s: (-(quotas[s] - counts[s]), s))
    counts[order[:short]] += 1
    return counts


class Apportionment:
    """Rows of each source at each step of one phase: floor(B·w) plus an extra row where the period's table says."""

    def __init__(self, weights: np.ndarray, batch: int, period: int = PERIOD):
        quotas = weights * batch
        self.base = np.floor(quotas).astype(np.int64)
        fractions = quotas - self.base
        self.extra_rows = batch - int(self.base.sum())  # R: sources with an extra row at each step
        self.period = period
        self.table = self._extras_table(fractions, period)
        """(period + 1, sources): extra rows each source has had before step t of the period."""

    def _extras_table(self, fractions: np.ndarray, period: int) -> np.ndarray:
        """Each step gives R sources an extra row, the R furthest behind their due (ties to the lower index); over
        the period source s gets exactly e_s = its largest-remainder share of R·period extras."""
        due = largest_remainder(fractions * period, self.extra_rows * period) if self.extra_rows else \
            np.zeros(len(fractions), np.int64)
        given = np.zeros(len(fractions), np.int64)
        table = np.zeros((period + 1, len(fractions)), np.int64)
        for t in range(period):
            deficit = due * (t + 1) / period - given
            open_ = given < due
            chosen = sorted(np.flatnonzero(open_), key=lambda s: (-deficit[s], s))[:self.extra_rows]
            given[chosen] += 1
            table[t + 1] = given
        if not (given == due).all():
            raise AssertionError(f"apportionment left {due - given} extras undealt")  # a bug, not a user's mistake
        return table

    def before(self, step: int) -> np.ndarray:
        """Rows of each source in the phase's steps [0, step)."""
        periods, within = divmod(step, self.period)
        return self.base * step + self.table[-1] * periods + self.table[within]

    def at(self, step: int) -> np.ndarray:
        """Rows of each source in the phase's step `step`."""
        return self.before(step + 1) - self.before(step)


@dataclass(frozen=True)
class Source:
    """One source's train rows: [start, stop) ranges of the split's row indices (its shards, in order)."""

    name: str
    ranges: tuple[tuple[int, int], ...]

    @property
    def rows(self) -> int:
        return sum(stop - start for start, stop in self.ranges)


class MixtureOrder:
    """Step → the global batch's B train rows (row indices of the split) and their sources."""

    def __init__(self, sources: list[Source], phases: list[tuple[int, np.ndarray]], *, batch: int, seed: int):
        empty = [s.name for s, w in zip(sources, np.max([w for _, w in phases], axis=0)) if w > 0 and not s.rows]
        if empty:
            raise ConfigError(f"source {empty[0]} has a weight but no train rows")
        self.sources, self.batch, self.seed = sources, batch, seed
        self.starts = [step for step, _ in phases]
        self.phases = [Apportionment(weights, batch) for _, weights in phases]
        self._epochs = [EpochOrder(s.rows, seed, key=(MIX_STREAM, ROWS, i)) if s.rows else None
                        for i, s in enumerate(sources)]
        """Each source's own stream of epochs (none for a source without rows: it is never read)."""
        self._offsets = [np.cumsum([0] + [stop - start for start, stop in s.ranges]) for s in sources]
        self._first = [np.array([start for start, _ in s.ranges], np.int64) for s in sources]

    def rows_before(self, step: int) -> np.ndarray:
        """Rows taken from each source in steps [0, step): what a source's epochs have walked."""
        total = np.zeros(len(self.sources), np.int64)
        for i, (start, phase) in enumerate(zip(self.starts, self.phases)):
            if step <= start:
                break
            end = self.starts[i + 1] if i + 1 < len(self.starts) else step
            total += phase.before(min(step, end) - start)
        return total

    def counts(self, step: int) -> np.ndarray:
        """Rows of each source in step `step`."""
        i = int(np.searchsorted(self.starts, step, side="right")) - 1
        return self.phases[i].at(step - self.starts[i])

    def step(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(source id, row index) of each of the step's B positions."""
        counts = self.counts(step)
        slots = np.repeat(np.arange(len(self.sources)), counts)
        which = slots[Permutation(self.batch, [self.seed, MIX_STREAM, SLOTS, step])(np.arange(self.batch))]
        before = self.rows_before(step)
        rows = np.empty(self.batch, np.int64)
        for s in np.flatnonzero(counts):  # a source's slots take its next ordinals, in position order
            rows[which == s] = self._row(int(s), int(before[s]), int(before[s] + counts[s]))
        return which, rows

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Row indices at stream positions [start, stop) of one step (a rank's share: trainer/data.py)."""
        step, offset = divmod(start, self.batch)
        if stop - step * self.batch > self.batch:
            raise ValueError(f"positions [{start}, {stop}) cross a step of {self.batch} rows")
        return self.step(step)[1][offset:stop - step * self.batch]

    def epochs(self, steps: int) -> np.ndarray:
        """Epochs of each source that `steps` steps take (fractional)."""
        return self.rows_before(steps) / np.maximum([s.rows for s in self.sources], 1)

    def _row(self, source: int, start: int, stop: int) -> np.ndarray:
        """The split's row index of a source's ordinals [start, stop): the position its epochs give each, then the
        range that position falls in."""
        within = self._epochs[source].rows(start, stop)
        offsets = self._offsets[source]
        shard = np.searchsorted(offsets, within, side="right") - 1
        return self._first[source][shard] + within - offsets[shard]


def phases_of(data, names: list[str], **groups) -> list[tuple[int, np.ndarray]]:
    """The job's [data] mix as phases (first step, weights in the order of `names`); [] when it sets none.
    `groups`: weights_of's groups and rows."""
    if data.mix:
        return [(0, weights_of(data.mix, names, **groups))]
    return [(step, weights_of(mix, names, flag=f"--data.mix_schedule's step {step}", **groups))
            for step, mix in parse_schedule(data.mix_schedule)] if data.mix_schedule else []


def mixture_order(data, dataset, *, batch: int) -> MixtureOrder | None:
    """The train split's order under the job's [data] mix (None: no mix, one permutation of all rows). The
    dataset's sources are its --input names, each a list of shard ranges."""
    if not (data.mix or data.mix_schedule):
        return None
    ranges = dataset.train.source_ranges()
    if ranges is None or not dataset.source_names:
        raise ConfigError(f"dataset {dataset.directory} records no sources (made before raylm recorded them); "
                          "prepare it again to train on a --data.mix of its inputs")
    names = dataset.source_names
    sources = [Source(name, tuple(ranges.get(i, ()))) for i, name in enumerate(names)]
    groups = {"groups": dataset.groups, "rows": [s.rows for s in sources]}
    return MixtureOrder(sources, phases_of(data, names, **groups), batch=batch, seed=data.seed)


def check_epochs(order: MixtureOrder, *, steps: int, max_epochs: int) -> None:
    """Refuse, before launch, a mix that would pass over a source more than data.max_epochs times in `steps`."""
    if not max_epochs:
        return
    for source, epochs in zip(order.sources, order.epochs(steps)):
        if epochs > max_epochs:
            raise ConfigError(f"source {source.name} ({source.rows:,} train rows) would need {math.ceil(epochs)} "
                              f"epochs in train.steps={steps} under this mix, more than data.max_epochs={max_epochs}: "
                              "lower its weight or the steps, raise data.max_epochs, or add data to it")


def source_metrics(order: MixtureOrder, *, step: int, seq_len: int) -> dict:
    """Per source, the tokens its rows have brought up to `step` and the epochs they make: what the mix consumed."""
    rows = order.rows_before(step)
    return {k: v for source, n in zip(order.sources, rows) for k, v in (
        (f"data/{source.name}/tokens", int(n) * seq_len), (f"data/{source.name}/epochs", n / max(source.rows, 1)))}


def mix_spec(data) -> dict | None:
    """A run's mix as its checkpoints record it (a resume under another mix is refused): as given, or None."""
    if data.mix:
        return {"data.mix": dict(data.mix)}
    return {"data.mix_schedule": [[step, mix] for step, mix in parse_schedule(data.mix_schedule)]} \
        if data.mix_schedule else None
