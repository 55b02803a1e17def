"""SentencePiece: train a lossless BPE tokenizer, and encode so that decode(encode(text)) == text, always.

Losslessness needs more than byte fallback: identity normalisation, no extra-whitespace removal, no dummy prefix,
and newline/tab as their own symbols because the trainer sees the corpus line by line. One case SentencePiece
still gets wrong is a literal U+2581 ('▁', its own space marker), which it decodes as a space; `encode_exact`
emits that character as its three UTF-8 byte tokens instead.
"""

from __future__ import annotations

import hashlib
import io
from typing import Iterable

import numpy as np
import sentencepiece as spm

from raylm.errors import DataError

SPACE_MARKER = "\u2581"
TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    user_defined_symbols=["\n", "\t"],
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    character_coverage=0.9999,
    max_sentence_length=16384,
    shuffle_input_sentence=False,
    minloglevel=2,
)


TRAIN_THREADS = 8
"""SentencePiece's BPE trainer gives other bytes on another thread count: fixed, so the tokenizer is the same on
whichever node trains it."""


def train_tokenizer(lines: Iterable[str], *, vocab_size: int, num_threads: int = TRAIN_THREADS) -> bytes:
    """A serialized SentencePiece model trained on `lines` (same lines and threads ⇒ same bytes)."""
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, num_threads=num_threads,
            **TRAINER_OPTIONS,
        )
    except RuntimeError as exc:
        reason = str(exc).splitlines()[0]
        raise DataError(
            f"tokenizer training failed with --vocab-size {vocab_size} ({reason}); "
            "pick a --vocab-size this sample supports, or give it more text (--tokenizer-sample-mb)"
        ) from None
    return model.getvalue()


def load_tokenizer(model_bytes: bytes, where: str = "tokenizer") -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model_bytes)
    except (RuntimeError, OSError):
        raise DataError(f"{where} is not a SentencePiece model; pass a .model file from SentencePiece") from None
    if sp.eos_id() < 0:
        raise DataError(f"{where} has no EOS token; raylm separates documents with EOS")
    return sp


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _space_marker_ids(sp: spm.SentencePieceProcessor) -> list[int]:
    ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_MARKER.encode()]
    if min(ids) <= sp.unk_id():
        raise DataError("tokenizer has no byte-fallback pieces; train it with byte_fallback=True")
    return ids


def encode_exact(sp: spm.SentencePieceProcessor, texts: list[str], num_threads: int = -1) -> list[list[int]]:
    """Token ids for each text such that `sp.decode(ids) == text` for any Unicode text."""
    ids = sp.encode(texts, out_type=int, num_threads=num_threads)
    for i, text in enumerate(texts):
        if SPACE_MARKER in text:
            marker = _space_marker_ids(sp)
            pieces = sp.encode(text.split(SPACE_MARKER), out_type=int)
            ids[i] = [t for j, piece in enumerate(pieces) for t in (marker if j else []) + piece]
    return ids


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (halves shard size and I/O), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
