"""What a Ray worker (or the driver, with `workers.local`) does with one work unit: read, tokenize, pack and write its shards, then commit it.

Each source (input) of the unit has packers of its own, so a row, and a shard, holds one source's tokens: held-out
loss can be measured per source from the manifest alone.

The driver gets back only the unit's stats (rows, tokens, documents, shard bytes and sha256, dropped tail, bad
records, the node it ran on): what it receives grows with the number of units, never with the number of tokens.
A unit is committed by its record in `_progress/` (written after its shards); a re-run reuses exactly the units
whose record matches, so a killed dataprep redoes only the rest. A unit whose run lost the output's lease (another
run took it over: this worker is a straggler) finishes no shard and writes no record: it gives up its attempts.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import resource
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa

from dataprep import chat, preference
from dataprep.config import EXAMPLE_FORMATS
from dataprep.output import SPLITS, progress_path
from dataprep.shards import ExamplePacker, SplitPacker
from dataprep.sources import BadRecord, Document, Record, read_documents, read_records
from dataprep.units import Unit
from raylm import storage
from raylm.lease import check_held
from raylm.tokenizer import load_tokenizer, token_dtype

ENCODE_CHARS = 1 << 20
"""Text encoded per SentencePiece call: amortises the call, bounds the Python lists it returns."""


def split_hash(*parts: object) -> float:
    """A stable hash of `parts` in [0, 1): the same on every machine, process and Python version."""
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass(frozen=True)
class UnitJob:
    """Everything a worker needs besides the unit itself (shipped once per actor)."""

    output: str
    tokenizer: dict[str, bytes]
    """The tokenizer's files themselves, not a path: a worker node may not see a local output directory."""
    run_stamp: str
    seq_len: int
    rows_per_shard: int
    val_fraction: float
    seed: int
    text_field: str
    encoding_errors: str
    on_bad_record: str
    format: str = "text"
    """'text': documents packed end to end; 'chat': conversations packed whole with a loss mask; 'preference': pairs
    of such examples (chosen, rejected), each pair whole in one row."""
    overlong: str = "truncate"
    """Chat: what happens to an example longer than a row."""
    lease: str = ""
    """The token of the run's lease on the output, checked before a unit's shards are made final ("": none)."""
    sources: int = 1
    """Sources of the dataset. With more than one, shard names carry the source; with one they are the names
    datasets had before sources were recorded, so such a dataset keeps its bytes."""
    bos: bool = False
    """Each document (each conversation whose template does not render it) starts with the tokenizer's BOS."""


def ray_node_id() -> str:
    """The Ray node this actor runs on (the summary counts units by node)."""
    import ray

    return ray.get_runtime_context().get_node_id()


SOURCE_COUNTS = ("rows", "tokens", "documents")
"""What a split's entry counts for each source."""
Packer = SplitPacker | ExamplePacker


class UnitPackers:
    """A unit's packers, one per (split, source) present in it, each made when its first tokens come: a row, and so
    a shard, never mixes sources."""

    def __init__(self, make: Callable[[str], Packer], unit_name: str, *, tagged: bool):
        self.make, self.unit_name, self.tagged = make, unit_name, tagged
        self.packers: dict[tuple[str, int], Packer] = {}

    def __getitem__(self, key: tuple[str, int]) -> Packer:
        """The packer of (split, source id)."""
        if key not in self.packers:
            self.packers[key] = self.make(self._stem(*key))
        return self.packers[key]

    def _stem(self, split: str, source: int) -> str:
        """`{split}/{unit}`, with `-sNNN` for the source only when the dataset has several."""
        return f"{split}/{self.unit_name}" + (f"-s{source:03d}" if self.tagged else "")

    def abort(self) -> None:
        for packer in self.packers.values():
            packer.abort()

    def publish(self) -> None:
        """Every finished shard of the unit under its final name."""
        for packer in self.packers.values():
            packer.publish()

    def finish(self) -> dict[str, dict]:
        """Each split's entry for the unit: its sources' shards in source order, each naming its source; their
        counts summed; and `by_source`, the SOURCE_COUNTS of each source present (keyed by source id)."""
        return {split: self._finish_split(split) for split in SPLITS}

    def _finish_split(self, split: str) -> dict:
        entries = {source: self.packers[split, source].finish() for s, source in sorted(self.packers) if s == split}
        if not entries:  # no document of the unit went to this split: a packer never fed gives zero counts, no shard
            return {**self.make(self._stem(split, 0)).finish(), "by_source": {}}
        counts = {k: sum(e[k] for e in entries.values()) for k in next(iter(entries.values())) if k != "shards"}
        shards = [{**shard, "source": source} for source, e in entries.items() for shard in e["shards"]]
        by_source = {str(source): {k: e[k] for k in SOURCE_COUNTS} for source, e in entries.items()}
        return {"shards": shards, **counts, "by_source": by_source}


class PackUnits:
    """Ray Data actor: one unit per call (the tokenizer is loaded once per actor). `workers.local` calls `pack` in
    the driver's process instead, with `node` given: Ray is then never imported."""

    def __init__(self, job: UnitJob, *, node: str | None = None):
        self.job = job
        self.tokenizer = load_tokenizer(job.tokenizer).with_bos(job.bos)
        self.in_document = False
        """Whether the last text encoded was a chunk of a document that goes on (no BOS before the next one)."""
        self.dtype = token_dtype(self.tokenizer.vocab_size)
        self.node = node if node is not None else ray_node_id()
        self.ready_at = time.time()

    def __call__(self, batch: pa.Table) -> pa.Table:
        stats = [json.dumps(self.pack(Unit.from_json(u))) for u in batch.column("unit").to_pylist()]
        return pa.table({"stats": stats})

    def pack(self, unit: Unit) -> dict:
        """The unit's stats; its shards and commit record are written, unless it met a bad record it must stop at."""
        started, cpu = time.time(), time.process_time()
        packers = UnitPackers(self._packer, unit.name, tagged=self.job.sources > 1)
        counts = {"bad_records": 0, "replaced_utf8_documents": 0}
        pack = self._pack_examples if self.job.format in EXAMPLE_FORMATS else self._pack_documents
        try:
            error = pack(unit, packers, counts)
            if error:
                packers.abort()
                return {"unit": unit.index, "error": error}
            splits = packers.finish()
            if self.job.lease:  # a straggler of a run that lost the output publishes nothing
                check_held(self.job.output, self.job.lease, what="dataset output")
            packers.publish()
        except BaseException:
            packers.abort()
            raise
        stats = {"unit": unit.index, "input_bytes": unit.input_bytes, **counts, "splits": splits}
        storage.write_bytes(progress_path(self.job.output, unit),
                            json.dumps({"stamp": unit.stamp(self.job.run_stamp), "stats": stats}).encode())
        return {**stats, "node": self.node, "ready_at": self.ready_at, "seconds": time.time() - started,
                "cpu_s": time.process_time() - cpu, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}

    def _packer(self, stem: str):
        if self.job.format in EXAMPLE_FORMATS:
            return ExamplePacker(self.job.output, stem, self.job.seq_len + 1, self.job.rows_per_shard, self.dtype,
                                 pad_id=self.tokenizer.eos_id, overlong=self.job.overlong)
        return SplitPacker(self.job.output, stem, self.job.seq_len + 1, self.job.rows_per_shard, self.dtype)

    def _pack_examples(self, unit: Unit, packers: UnitPackers, counts: dict) -> str | None:
        """Each conversation (or preference pair) of the unit, tokenized with its loss mask, to its split's and
        source's packer; the first bad record's one-line description if the run stops at bad records."""
        for part in unit.parts:
            for record in read_records(part, encoding_errors=self.job.encoding_errors):
                example = record if isinstance(record, BadRecord) else self._tokenize(record)
                if isinstance(example, BadRecord):
                    if self.job.on_bad_record == "error":
                        return f"{example.where}: {example.reason}"
                    counts["bad_records"] += 1
                    continue
                counts["replaced_utf8_documents"] += record.replaced_utf8
                packer = packers[self._split(example), part.source]
                if isinstance(example, preference.Pair):  # one row holds both: training never sees half a pair
                    packer.add_together([(e.tokens, e.loss) for e in (example.chosen, example.rejected)])
                else:
                    packer.add(example.tokens, example.loss)
        return None

    def _tokenize(self, record: Record) -> chat.Example | preference.Pair | BadRecord:
        if self.job.format == "preference":
            return preference.tokenize_pair(self.tokenizer, record, positions=self.job.seq_len + 1)
        return chat.tokenize(self.tokenizer, record)

    def _pack_documents(self, unit: Unit, packers: UnitPackers, counts: dict) -> str | None:
        """Feed every document of the unit to its split's and source's packer, ENCODE_CHARS at a time; the first
        bad record's one-line description if the run stops at bad records."""
        read = {"text_field": self.job.text_field, "encoding_errors": self.job.encoding_errors}
        self.in_document = False  # a unit starts with a document's start (a unit run again after an error too)
        pending: list[tuple[int, Document]] = []
        chars, replaced = 0, False
        for part in unit.parts:
            for record in read_documents(part, **read):
                if isinstance(record, BadRecord):
                    if self.job.on_bad_record == "error":
                        return f"{record.where}: {record.reason}"
                    counts["bad_records"] += 1
                    continue
                replaced |= record.replaced_utf8
                if record.ends:
                    counts["replaced_utf8_documents"] += replaced
                    replaced = False
                pending.append((part.source, record))
                chars += len(record.text)
                if chars >= ENCODE_CHARS:
                    self._encode(pending, packers)
                    pending, chars = [], 0
        self._encode(pending, packers)
        return None

    def _encode(self, docs: list[tuple[int, Document]], packers: UnitPackers) -> None:
        """Tokens of `docs` (each with its source id) to their split's and source's packer, in order; EOS closes each
        document, and BOS opens it when the dataset has documents start with BOS."""
        ids = self.tokenizer.encode([d.text for _, d in docs], num_threads=1)  # one core per actor
        streams: dict[tuple[str, int], list[list[int]]] = {}
        documents: Counter = Counter()
        for (source, doc), tokens in zip(docs, ids):
            key = (self._split(doc), source)
            if self.tokenizer.bos_first and not self.in_document:
                tokens.insert(0, self.tokenizer.bos_id)
            self.in_document = not doc.ends
            if doc.ends:
                tokens.append(self.tokenizer.eos_id)
                documents[key] += 1
            streams.setdefault(key, []).append(tokens)
        for key, lists in streams.items():
            flat = np.fromiter(itertools.chain.from_iterable(lists), self.dtype, count=sum(map(len, lists)))
            packers[key].add(flat, documents[key])

    def _split(self, doc: Document | chat.Example | preference.Pair) -> str:
        val = self.job.val_fraction > 0 and split_hash(self.job.seed, "split", doc.key) < self.job.val_fraction
        return "val" if val else "train"
