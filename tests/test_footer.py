"""The Arrow footer parser trusts nothing its row offsets depend on: a shard unlike what the manifest describes (another
batch size, nulls, compression, another token type) is a one-line error naming it, never wrong rows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from raylm.dataset import Split, shard_schema
from raylm.errors import DataError
from raylm.shard_writer import ShardWriter

ROW_LEN, ROWS_PER_BATCH = 9, 4


def rows(n: int, dtype=np.uint16) -> np.ndarray:
    return (np.arange(n * ROW_LEN) % 60000).astype(dtype).reshape(n, ROW_LEN)


def split(directory, n: int, dtype: str = "uint16") -> Split:
    """The split a manifest of one shard `s.arrow` of `n` rows in batches of ROWS_PER_BATCH describes."""
    return Split(str(directory), {"shards": [{"file": "s.arrow", "rows": n}]}, rows_per_batch=ROWS_PER_BATCH,
                 row_len=ROW_LEN, dtype=dtype)


def write(directory, batches: list[pa.Array], schema: pa.Schema, **options) -> None:
    """A shard of these record batches, written by pyarrow with these IpcWriteOptions."""
    with pa.ipc.new_file(str(directory / "s.arrow"), schema, options=pa.ipc.IpcWriteOptions(**options)) as w:
        for array in batches:
            w.write_batch(pa.record_batch([array], schema=schema))


def lists(data: np.ndarray, mask: np.ndarray | None = None) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(data.reshape(-1)), ROW_LEN,
                                             mask=None if mask is None else pa.array(mask))


@pytest.mark.parametrize("dtype,n", [("uint16", 11), ("uint32", 11), ("uint16", 12), ("uint16", 3)])
def test_every_shard_dataprep_writes_reads_back_row_for_row(tmp_path, dtype, n):
    data = rows(n, np.dtype(dtype))  # batches of 4 rows, the last one the rest, as dataprep's RowSink writes them
    writer = ShardWriter(str(tmp_path), "s.arrow", np.dtype(dtype), ROW_LEN)
    for lo in range(0, n, ROWS_PER_BATCH):
        writer.write(data[lo:lo + ROWS_PER_BATCH])
    writer.close()
    s = split(tmp_path, n, dtype)
    assert np.array_equal(s.rows(np.arange(n)[::-1]), data[::-1]) and np.array_equal(s[n - 1], data[n - 1])


def one_line_error(s: Split, what: str) -> str:
    with pytest.raises(DataError) as err:
        s.rows(np.arange(len(s)))
    message = str(err.value)
    assert "\n" not in message and "s.arrow" in message and what in message, message
    return message


def test_another_batch_size_is_refused(tmp_path):
    data = rows(12)
    write(tmp_path, [lists(data[:6]), lists(data[6:])], shard_schema(np.dtype(np.uint16), ROW_LEN))
    one_line_error(split(tmp_path, 12), "record batches")  # 2 batches where the manifest's batches of 4 make 3


def test_a_later_batch_of_another_size_is_refused(tmp_path):
    """Batches of 4, 2, 6 and 2 rows where the manifest's make 4, 4, 4 and 2: the block count and the first and last
    batches are as the manifest says."""
    data = rows(14)
    parts = [data[:4], data[4:6], data[6:12], data[12:]]
    write(tmp_path, [lists(p) for p in parts], shard_schema(np.dtype(np.uint16), ROW_LEN))
    one_line_error(split(tmp_path, 14), "unlike its first")


def test_nulls_in_a_later_batch_are_refused(tmp_path):
    data = rows(12)
    mask = np.array([False, True, False, False])
    write(tmp_path, [lists(data[:4]), lists(data[4:8], mask=mask), lists(data[8:])],
          shard_schema(np.dtype(np.uint16), ROW_LEN))
    one_line_error(split(tmp_path, 12), "unlike its first")


def test_nulls_in_the_only_batch_are_refused(tmp_path):
    write(tmp_path, [lists(rows(3), mask=np.array([False, False, True]))], shard_schema(np.dtype(np.uint16), ROW_LEN))
    one_line_error(split(tmp_path, 3), "has nulls")


@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_a_compressed_shard_is_refused(tmp_path, codec):
    data = rows(12)
    write(tmp_path, [lists(data[i:i + 4]) for i in (0, 4, 8)], shard_schema(np.dtype(np.uint16), ROW_LEN),
          compression=codec)
    one_line_error(split(tmp_path, 12), "compressed")


def test_uint32_tokens_where_the_manifest_says_uint16_are_refused(tmp_path):
    """Written as dataprep writes uint32 shards, in batches of the same bytes (half the rows of the uint16 ones):
    every block's body is what the manifest's uint16 batches take, only the schema tells them apart."""
    data = rows(12, np.uint32)
    write(tmp_path, [lists(data[i:i + 2]) for i in range(0, 12, 2)], shard_schema(np.dtype(np.uint32), ROW_LEN))
    assert "holds uint32 tokens where the manifest says uint16" in one_line_error(split(tmp_path, 24), "uint32")


def test_a_shard_of_another_row_length_is_refused(tmp_path):
    data = rows(8)
    schema = pa.schema([pa.field("tokens", pa.list_(pa.uint16(), 2 * ROW_LEN))])
    array = pa.FixedSizeListArray.from_arrays(pa.array(data.reshape(-1)), 2 * ROW_LEN)
    write(tmp_path, [array], schema)
    one_line_error(split(tmp_path, 8), f"fixed-size lists of {ROW_LEN} tokens")
