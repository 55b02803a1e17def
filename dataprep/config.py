"""The config of `python -m dataprep`: one section per concern, loaded like every raylm config (defaults < preset <
TOML < `--section.field=value`), plus the short flags of the first version (`--input`, `--vocab-size`, …) as aliases.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from raylm.storage import StorageConfig

from raylm.errors import ConfigError
from raylm.paths import InPath, OutPath

BAD_RECORD = ("error", "skip")
FORMATS = ("text", "chat", "preference")
EXAMPLE_FORMATS = ("chat", "preference")
"""Formats read as .jsonl records through the tokenizer's chat template into rows of whole examples with a loss
mask (raylm.dataset.PLANES)."""
OVERLONG = ("truncate", "drop")
BOS = ("auto", "on", "off")
ENCODING_ERRORS = ("strict", "replace")


def _check(rules: list[tuple[bool, str, object, str]]) -> None:
    """The first failed rule as one line naming the field (and its short flag, if it has one) and the value."""
    for ok, name, value, rule in rules:
        if not ok:
            flag = next((f" ({flag})" for flag, field in ALIASES.items() if field == name), "")
            raise ConfigError(f"{name}={value!r}{flag}: {rule}")


@dataclass(kw_only=True)
class InputConfig:
    paths: list[InPath] = field(default_factory=list)
    """Files, directories (recursive), globs (`*` stays in one folder, `**` crosses folders) or s3:// prefixes;
    .txt/.md/.py/… (one file = one document), .jsonl, .parquet, optionally .gz/.zst. None: the demo corpus."""
    format: str = "text"
    """'text': documents packed end to end for pretraining. 'chat': .jsonl conversations (`messages: [{role,
    content}]` or `prompt`/`response`) for fine-tuning, through the tokenizer's chat template, each packed whole
    with a loss mask on its assistant turns (needs --tokenizer: the model's own). 'preference': .jsonl pairs for
    preference tuning (`prompt` (text or messages), `chosen` and `rejected` (text or an assistant message), or TRL's
    `chosen`/`rejected` message lists sharing all but the last), each reply rendered as 'chat' renders a
    conversation's last turn, with loss on it alone, and the pair's two examples packed whole into one row."""
    text_field: str = "text"
    """Field (.jsonl) or column (.parquet) holding the text."""
    on_bad_record: str = "error"
    """A bad file/line (not JSON, missing field, corrupt, binary): 'error' stops with its name, 'skip' counts it."""
    encoding_errors: str = "strict"
    """Invalid UTF-8: 'strict' stops with the file and byte offset, 'replace' replaces the bytes and counts it."""
    max_files: int | None = None
    """Use only the first N files in path order (quick runs)."""

    def __post_init__(self):
        _check([
            (self.format in FORMATS, "input.format", self.format, "must be text, chat or preference"),
            (self.on_bad_record in BAD_RECORD, "input.on_bad_record", self.on_bad_record, "must be error or skip"),
            (self.encoding_errors in ENCODING_ERRORS, "input.encoding_errors", self.encoding_errors,
             "must be strict or replace"),
            (self.max_files is None or self.max_files >= 1, "input.max_files", self.max_files, "must be >= 1"),
        ])


@dataclass(kw_only=True)
class TokenizerConfig:
    file: InPath | None = None
    """An existing tokenizer (local or s3://) to use instead of training one: a SentencePiece .model, a Hugging Face
    tokenizer.json, or a folder holding one (a Hugging Face model folder, a raylm dataset or run directory)."""
    vocab_size: int = 32000
    """Vocabulary of the trained BPE tokenizer (byte fallback, so any text encodes)."""
    sample_mb: float = 64.0
    """Text sampled (seeded, spread over files) to train the tokenizer."""
    sample_file_mb: float = 1.0
    """Most text the sample takes from one file (raised to sample_mb / files when the corpus has few files)."""

    def __post_init__(self):
        _check([
            (300 <= self.vocab_size <= 1 << 32, "tokenizer.vocab_size", self.vocab_size,
             "must be in [300, 2**32] (bytes + specials, uint32 ids)"),
            (self.sample_mb > 0, "tokenizer.sample_mb", self.sample_mb, "must be > 0"),
            (self.sample_file_mb > 0, "tokenizer.sample_file_mb", self.sample_file_mb, "must be > 0"),
        ])


@dataclass(kw_only=True)
class PackConfig:
    seq_len: int = 2048
    """Tokens per training sequence; rows hold seq_len + 1."""
    val_fraction: float = 0.005
    """Share of documents sent to val/ (by a seeded hash of their file and position); 1 makes a held-out set for
    `python -m trainer.eval` and --eval.datasets, all of it in val/."""
    seed: int = 0
    """Seeds the tokenizer sample and the train/val split."""
    unit_mb: float = 256.0
    """Input bytes per work unit: consecutive files (or byte ranges / row groups of one big file) up to this size.
    Fixed by the input, never by the cluster; each unit's partial last row is dropped."""
    shard_mb: float = 128.0
    """Largest shard file a unit writes (a unit's rows go to one or more shards)."""
    overlong: str = "truncate"
    """Chat: an example longer than seq_len + 1 tokens is cut to that length ('truncate') or left out ('drop');
    either way it is counted in the manifest. One whose prompt leaves no room in a row for a reply token is left out
    either way (counted as `no_reply`). Preference pairs are never cut: one longer than a row is a bad record."""
    bos: str = "auto"
    """Put the tokenizer's BOS at the start of each document (text), or of each conversation whose chat template
    does not render it already: 'auto' does when the model expects it (a Hugging Face tokenizer that adds its BOS,
    as Llama 3's does), never with raylm's own tokenizer; 'on' or 'off' decide."""

    def __post_init__(self):
        _check([
            (self.seq_len >= 1, "pack.seq_len", self.seq_len, "must be >= 1"),
            (0 <= self.val_fraction <= 1, "pack.val_fraction", self.val_fraction, "must be in [0, 1]"),
            (self.unit_mb > 0, "pack.unit_mb", self.unit_mb, "must be > 0"),
            (self.shard_mb > 0, "pack.shard_mb", self.shard_mb, "must be > 0"),
            (self.overlong in OVERLONG, "pack.overlong", self.overlong, "must be truncate or drop"),
            (self.bos in BOS, "pack.bos", self.bos, "must be auto, on or off"),
        ])


@dataclass(kw_only=True)
class OutputConfig:
    dir: OutPath = ""
    """Dataset directory, local or s3:// (the demo writes data/stdlib)."""
    overwrite: bool = False
    """Replace a finished dataset, or an unfinished run, made with other inputs or settings."""


@dataclass(kw_only=True)
class WorkersConfig:
    num_workers: int | None = None
    """Tokenizer actors, one CPU each, started as the cluster has CPUs for them (default: one per CPU present)."""
    local: bool = False
    """Without Ray: train the tokenizer and pack every unit in this process, one unit after another (a machine
    with no Ray installed, such as a bare GPU box). The same bytes as on any Ray cluster; only slower."""

    def __post_init__(self):
        _check([(self.num_workers is None or self.num_workers >= 1, "workers.num_workers", self.num_workers,
                 "must be >= 1")])


@dataclass(kw_only=True)
class DataprepConfig:
    input: InputConfig = field(default_factory=InputConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def settings(self) -> dict:
        """What determines the output bytes: a dataset or unfinished run with other settings is never reused.
        Training options count only when the tokenizer is trained (a given one counts by its content, added by the
        run); the input paths count as the files they list."""
        tokenizer = {} if self.tokenizer.file else {k: v for k, v in asdict(self.tokenizer).items() if k != "file"}
        pack = {k: v for k, v in asdict(self.pack).items() if k != "bos"}  # counted as resolved, by the run
        settings = {**{k: v for k, v in asdict(self.input).items() if k != "paths"}, **tokenizer, **pack}
        if self.input.format == "text":  # what only chat data has: text datasets keep the stamp they always had
            del settings["format"], settings["overlong"]
        return settings


ALIASES = {
    "--input": "input.paths",
    "--format": "input.format",
    "--output": "output.dir",
    "--tokenizer": "tokenizer.file",
    "--vocab-size": "tokenizer.vocab_size",
    "--tokenizer-sample-mb": "tokenizer.sample_mb",
    "--seq-len": "pack.seq_len",
    "--val-fraction": "pack.val_fraction",
    "--text-field": "input.text_field",
    "--shard-size": "pack.shard_mb",
    "--num-workers": "workers.num_workers",
    "--seed": "pack.seed",
    "--on-bad-record": "input.on_bad_record",
    "--encoding-errors": "input.encoding_errors",
    "--max-files": "input.max_files",
    "--overwrite": "output.overwrite",
    "--bos": "pack.bos",
}
"""The first version's flags, kept so every command written for it still runs (and `--bos`)."""
