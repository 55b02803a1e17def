"""Packing a unit's documents into fixed-length rows, streamed into shard files (`raylm.shard_writer`).

Rows are `seq_len + 1` tokens so a row gives both inputs and shifted targets. Documents are packed end to end (each
ends in EOS), with no padding; the unit's partial last row of each split is dropped and counted. Chat examples are
packed whole, with the example index and loss mask beside the tokens (`ExamplePacker`). Shards are written
as they fill, a record batch at a time, so a unit's memory is one batch of rows however big its input is. A shard
appears under its final name only when its unit is committed (`publish`: local, renamed; S3, copied), after the
unit has checked that its run still holds the output; a unit given up deletes only its own attempts, never a shard
another attempt (a re-run beside a straggler) finished.
"""

from __future__ import annotations

import numpy as np

from raylm.dataset import PLANES, rows_per_batch
from raylm.shard_writer import ShardWriter


class RowSink:
    """Full rows in; record batches of `rows_per_batch` rows out, to shards of `rows_per_shard` rows.

    Every batch of a shard holds `rows_per_batch` rows except its last, which is what readers index by."""

    def __init__(self, out_dir: str, stem: str, row_len: int, rows_per_shard: int, dtype: np.dtype):
        self.out_dir, self.stem, self.row_len, self.dtype = out_dir, stem, row_len, dtype
        self.rows_per_shard, self.rows_per_batch = rows_per_shard, rows_per_batch(row_len, dtype)
        self.shards: list[dict] = []
        self.buffered: list[np.ndarray] = []
        self.buffered_rows = 0
        self._writer: ShardWriter | None = None
        self._finished: list[ShardWriter] = []

    def add(self, rows: np.ndarray) -> None:
        """Rows of shape (n, row_len); written as soon as a record batch is full."""
        self.buffered.append(rows)
        self.buffered_rows += len(rows)
        while self.buffered_rows >= self._rows_next():
            self._write(self._rows_next())

    def finish(self) -> list[dict]:
        """Write what is buffered and close the last shard; the shards' manifest entries."""
        while self.buffered_rows:
            self._write(min(self.buffered_rows, self._rows_next()))
        self._close_shard()
        return self.shards

    def publish(self) -> None:
        """Give the finished shards their final names (once the unit may commit)."""
        while self._finished:
            self._finished.pop(0).publish()

    def abort(self) -> None:
        """Stop, leaving no trace of the shards not published (an attempt of this unit only)."""
        for writer in [*self._finished, *([self._writer] if self._writer else [])]:
            writer.discard()
        self._finished, self._writer = [], None

    def _rows_next(self) -> int:
        """Rows of the next batch: a full batch, or what is left of the current shard."""
        written = self._writer.rows if self._writer else 0
        return min(self.rows_per_batch, self.rows_per_shard - written)

    def _write(self, n_rows: int) -> None:
        rows = np.concatenate(self.buffered) if len(self.buffered) > 1 else self.buffered[0]
        self.buffered, self.buffered_rows = [rows[n_rows:]], len(rows) - n_rows
        if self._writer is None:
            name = f"{self.stem}-{len(self.shards):03d}.arrow"
            self._writer = ShardWriter(self.out_dir, name, self.dtype, self.row_len)
        self._writer.write(rows[:n_rows].astype(self.dtype, copy=False))
        if self._writer.rows == self.rows_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is not None:
            self.shards.append(self._writer.finish())
            self._finished.append(self._writer)
            self._writer = None


class SplitPacker:
    """One split's rows of one unit: documents' token streams in, cut end to end into rows of `row_len` tokens."""

    def __init__(self, out_dir: str, stem: str, row_len: int, rows_per_shard: int, dtype: np.dtype):
        self.row_len = row_len
        self.sink = RowSink(out_dir, stem, row_len, rows_per_shard, dtype)
        self.documents = self.tokens = 0
        self._pending: list[np.ndarray] = []
        self._pending_len = 0

    def add(self, tokens: np.ndarray, documents: int) -> None:
        self.documents += documents
        self.tokens += len(tokens)
        self._pending.append(tokens)
        self._pending_len += len(tokens)
        if self._pending_len >= self.sink.rows_per_batch * self.row_len:
            self._cut_rows()

    def finish(self) -> dict:
        """Write the remaining full rows, drop the partial one, and return this split's entry for the unit."""
        self._cut_rows()
        shards = self.sink.finish()
        rows = sum(s["rows"] for s in shards)
        return {"shards": shards, "rows": rows, "documents": self.documents, "tokens": self.tokens,
                "dropped_tokens": self.tokens - rows * self.row_len}

    def abort(self) -> None:
        self.sink.abort()

    def publish(self) -> None:
        self.sink.publish()

    def _cut_rows(self) -> None:
        """Every full row of the pending stream to the sink; the partial rest stays pending."""
        stream = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0] if self._pending \
            else np.zeros(0, self.sink.dtype)
        full = len(stream) // self.row_len
        if full:
            self.sink.add(stream[:full * self.row_len].reshape(full, self.row_len))
        self._pending, self._pending_len = [stream[full * self.row_len:]], len(stream) - full * self.row_len


class ExamplePacker:
    """One split's rows of one unit for chat data: whole examples placed one after another in a row, never split
    across rows (a row that cannot take the next example is padded and closed). An example longer than a row is
    cut to its first `positions` tokens or dropped (`overlong`), and counted. An example with no target carrying loss
    in its first `positions` tokens (a prompt that fills the row) is dropped and counted as `no_reply` whatever
    `overlong` says: a row of it would be trained on for nothing. Examples added together (a preference pair) share
    a row, so pair j of a row has examples 2j+1 (chosen) and 2j+2 (rejected). Rows are the PLANES side by side."""

    def __init__(self, out_dir: str, stem: str, positions: int, rows_per_shard: int, dtype: np.dtype, *,
                 pad_id: int, overlong: str):
        self.positions, self.pad_id, self.overlong = positions, pad_id, overlong
        self.sink = RowSink(out_dir, stem, len(PLANES) * positions, rows_per_shard, dtype)
        self.counts = dict.fromkeys(("documents", "tokens", "loss_tokens", "padding_tokens", "truncated", "dropped",
                                     "no_reply", "dropped_tokens"), 0)
        self._row = self._empty_row()
        self._fill = self._examples = 0
        self._rows: list[np.ndarray] = []

    def _empty_row(self) -> np.ndarray:
        row = np.zeros((len(PLANES), self.positions), dtype=np.int64)
        row[0] = self.pad_id
        return row

    def add(self, tokens: list[int], loss: list[bool]) -> None:
        if not any(loss[1:self.positions]):  # an example's first token is no target (see below)
            self.counts["no_reply"] += 1
            self.counts["dropped_tokens"] += len(tokens)
            return
        if len(tokens) > self.positions:
            if self.overlong == "drop":
                self.counts["dropped"] += 1
                self.counts["dropped_tokens"] += len(tokens)
                return
            self.counts["truncated"] += 1
            self.counts["dropped_tokens"] += len(tokens) - self.positions
            tokens, loss = tokens[:self.positions], loss[:self.positions]
        self._place([(tokens, loss)])

    def add_together(self, examples: list[tuple[list[int], list[bool]]]) -> None:
        """Examples that must share a row (a preference pair: chosen, then rejected), placed side by side and
        counted as one document; the caller has checked that they fit in a row together."""
        if sum(len(tokens) for tokens, _ in examples) > self.positions:
            raise ValueError(f"examples of {[len(t) for t, _ in examples]} tokens do not fit a row of "
                             f"{self.positions} together")
        self._place(examples)

    def _place(self, examples: list[tuple[list[int], list[bool]]]) -> None:
        """The examples one after another in the current row, or in a new one if they do not all fit in it."""
        if self._fill + sum(len(tokens) for tokens, _ in examples) > self.positions:
            self._close_row()
        for tokens, loss in examples:
            start, end = self._fill, self._fill + len(tokens)
            self._examples += 1
            self._row[0, start:end] = tokens
            self._row[1, start:end] = self._examples
            self._row[2, start + 1:end] = loss[1:]  # an example's first token is no target within the example
            self._fill = end
            self.counts["tokens"] += len(tokens)
            self.counts["loss_tokens"] += int(sum(loss[1:]))
        self.counts["documents"] += 1

    def _close_row(self) -> None:
        if self._fill:
            self.counts["padding_tokens"] += self.positions - self._fill
            self._rows.append(self._row.reshape(-1))
            self._row, self._fill, self._examples = self._empty_row(), 0, 0
        if len(self._rows) >= self.sink.rows_per_batch:
            self.sink.add(np.stack(self._rows))
            self._rows = []

    def finish(self) -> dict:
        """Close the last row (padded: chat rows are never dropped) and return this split's entry for the unit."""
        self._close_row()
        if self._rows:
            self.sink.add(np.stack(self._rows))
        shards = self.sink.finish()
        return {"shards": shards, "rows": sum(s["rows"] for s in shards), **self.counts}

    def abort(self) -> None:
        self.sink.abort()

    def publish(self) -> None:
        self.sink.publish()
