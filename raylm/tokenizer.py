"""Tokenizers: SentencePiece (the one raylm trains, lossless) or a Hugging Face `tokenizer.json` (a published model's
own), behind one small interface, and each with a chat template.

SentencePiece losslessness needs more than byte fallback: identity normalisation, no extra-whitespace removal, no
dummy prefix, and newline/tab as their own symbols because the trainer sees the corpus line by line. One case
SentencePiece still gets wrong is a literal U+2581 ('▁', its own space marker), which it decodes as a space;
`encode_exact` emits that character as its three UTF-8 byte tokens instead.

A tokenizer travels as its files (`Tokenizer.files`: name → bytes): `tokenizer.model` for SentencePiece;
`tokenizer.json` plus, when the folder has them, `tokenizer_config.json` (EOS/BOS tokens, chat template) and
`chat_template.jinja` for Hugging Face. Datasets, run directories, weights files and exports carry exactly these.

Chat: raylm's SentencePiece tokenizers reserve the role markers of raylm's template (CHAT_MARKERS) as control
symbols, which text never encodes to: only the template inserts them. A Hugging Face tokenizer brings its own
template (Jinja, rendered as transformers renders it) and special tokens.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import io
import json
import re
from typing import Iterable

import numpy as np
import sentencepiece as spm

from raylm import storage
from raylm.errors import DataError, StorageError

SPACE_MARKER = "\u2581"
BYTE_PIECE = re.compile("<0x[0-9A-F]{2}>")
CHAT_MARKERS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
RAYLM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
"""raylm's chat template (version 1), in the Jinja form transformers' `apply_chat_template` renders: each message is
its role marker, its text and `<|end|>`; a reply is generated after `<|assistant|>` and ends at `<|end|>`."""
RAYLM_CHAT_NAME = "raylm-chat-v1"
TRAINER_OPTIONS = dict(
    model_type="bpe",
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    user_defined_symbols=["\n", "\t"],
    control_symbols=list(CHAT_MARKERS),
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=-1,
    character_coverage=0.9999,
    max_sentence_length=16384,
    shuffle_input_sentence=False,
    minloglevel=2,
)
SP_FILE, HF_FILE, HF_CONFIG, HF_TEMPLATE = "tokenizer.model", "tokenizer.json", "tokenizer_config.json", \
    "chat_template.jinja"
TOKENIZER_FILES = (SP_FILE, HF_FILE, HF_CONFIG, HF_TEMPLATE)
"""Every file name a tokenizer may consist of."""


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


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Tokenizer:
    """What raylm asks of a tokenizer. `encode` is for plain text (documents, prompts typed by a user): with
    SentencePiece no text ever becomes a control token; `encode_rendered` is for the output of the chat template,
    where the template's special tokens are tokens."""

    kind: str
    files: dict[str, bytes]
    vocab_size: int
    eos_id: int
    bos_id: int | None
    chat_template: str | None
    """Jinja source of the chat template (None: the tokenizer has none)."""
    chat_template_name: str | None
    bos_token: str | None
    eos_token: str
    bos_first: bool = False
    """Whether each document starts with BOS: the format the model was trained in. A Hugging Face tokenizer that
    adds its BOS when it encodes a text (tokenizer.json's post-processor, as transformers encodes) says yes;
    raylm's SentencePiece says no (documents are separated by EOS alone); a dataset's tokenizer says what the
    dataset was made with (`--bos`)."""

    @property
    def document_start(self) -> int:
        """The token a document follows: BOS when documents start with it, else EOS (the end of the one before).
        Every scorer puts it before a text, so a model sees the format it was trained in."""
        return self.bos_id if self.bos_first else self.eos_id

    def with_bos(self, on: bool) -> Tokenizer:
        """This tokenizer with its documents starting with BOS or not (a dataset's `--bos` choice)."""
        if on and self.bos_id is None:
            raise DataError("the tokenizer has no BOS token; make the dataset with --bos off (or auto)")
        chosen = copy.copy(self)  # the same encoder underneath
        chosen.bos_first = on
        return chosen

    def encode(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        raise NotImplementedError

    def encode_rendered(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        raise NotImplementedError

    def special_strings(self) -> list[str]:
        """Texts that are special tokens in rendered chat: a message containing one would forge the structure."""
        raise NotImplementedError

    def token_string(self, token_id: int) -> str:
        raise NotImplementedError

    @functools.cached_property
    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes of text each token id stands for in running text (0 for EOS and other special tokens): what
        bits per byte divides by, so models with different vocabularies compare."""
        return np.array([self._bytes_of(i) for i in range(self.vocab_size)], dtype=np.int64)

    def _bytes_of(self, token_id: int) -> int:
        raise NotImplementedError

    @property
    def sha256(self) -> str:
        """Identity of the tokenizer: of the SentencePiece model, or of all the Hugging Face files."""
        if self.kind == "sentencepiece":
            return sha256(self.files[SP_FILE])
        return sha256(b"".join(name.encode() + b"\0" + sha256(data).encode() for name, data in sorted(self.files.items())))

    def describe(self) -> dict:
        """The tokenizer's entry in a dataset manifest."""
        return {"kind": self.kind, "files": sorted(self.files), "sha256": self.sha256, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id, "chat_template": self.chat_template_name}


class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, model: bytes, where: str):
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model)
        except (RuntimeError, OSError):
            raise DataError(f"{where} is not a SentencePiece model or Hugging Face tokenizer; pass a .model file, "
                            "a tokenizer.json or a folder holding one") from None
        if self.sp.eos_id() < 0:
            raise DataError(f"{where} has no EOS token; raylm separates documents with EOS")
        self.files, self.vocab_size, self.eos_id = {SP_FILE: model}, self.sp.vocab_size(), self.sp.eos_id()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_token = self.sp.id_to_piece(self.eos_id)
        self.bos_token = self.sp.id_to_piece(self.bos_id) if self.bos_id is not None else None
        self.markers = {m: self.sp.piece_to_id(m) for m in CHAT_MARKERS}
        has_chat = all(self.sp.is_control(i) and i != self.sp.unk_id() for i in self.markers.values())
        self.chat_template = RAYLM_CHAT_TEMPLATE if has_chat else None
        self.chat_template_name = RAYLM_CHAT_NAME if has_chat else None
        self._split = re.compile("(" + "|".join(map(re.escape, CHAT_MARKERS)) + ")")

    def encode(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        return encode_exact(self.sp, texts, num_threads)

    def encode_rendered(self, text: str) -> list[int]:
        parts = self._split.split(text)
        pieces = encode_exact(self.sp, parts[0::2], num_threads=1)
        return [t for i, piece in enumerate(pieces) for t in ([self.markers[parts[2 * i - 1]]] if i else []) + piece]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(list(ids))

    def special_strings(self) -> list[str]:
        return list(CHAT_MARKERS)

    def token_string(self, token_id: int) -> str:
        return self.sp.id_to_piece(token_id)

    def _bytes_of(self, token_id: int) -> int:
        if self.sp.is_byte(token_id):
            return 1
        if self.sp.is_control(token_id) or self.sp.is_unknown(token_id):
            return 0
        return len(self.sp.id_to_piece(token_id).replace(SPACE_MARKER, " ").encode())


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer(Tokenizer):
    kind = "huggingface"
    END_OF_TEXT = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<|im_end|>", "<eos>")
    """EOS of a bare tokenizer.json (no tokenizer_config.json), by the names published models use."""

    def __init__(self, files: dict[str, bytes], where: str):
        from tokenizers import Tokenizer as Fast

        try:
            config = json.loads(files.get(HF_CONFIG, b"{}"))
        except ValueError:
            raise DataError(f"{where}: {HF_CONFIG} is not valid JSON") from None
        try:
            self.tok = Fast.from_str(files[HF_FILE].decode("utf-8", errors="replace"))
        except Exception as exc:  # the Rust library raises a bare Exception for any file it cannot parse
            raise DataError(f"{where} is not a Hugging Face tokenizer ({str(exc).splitlines()[0][:200]})") from exc
        self.files, self.vocab_size = files, self.tok.get_vocab_size(with_added_tokens=True)
        self._added = self.tok.get_added_tokens_decoder()
        added = {t.content: i for i, t in self._added.items() if t.special}
        self.specials = sorted(added, key=len, reverse=True)
        eos = _token_text(config.get("eos_token")) or next((t for t in self.END_OF_TEXT if t in added), None)
        if eos is None or self.tok.token_to_id(eos) is None:
            raise DataError(f"{where} names no EOS token raylm can find; pass the model's folder (with "
                            f"{HF_CONFIG}) instead of {HF_FILE} alone")
        self.eos_id, self.eos_token = self.tok.token_to_id(eos), eos
        self.bos_token = _token_text(config.get("bos_token"))
        self.bos_id = self.tok.token_to_id(self.bos_token) if self.bos_token else None
        self.bos_first = self.bos_id is not None and self._adds_bos()
        self.chat_template = self._template(files, config)
        self.chat_template_name = (f"hf-{sha256(self.chat_template.encode())[:12]}" if self.chat_template else None)

    def _adds_bos(self) -> bool:
        """Whether transformers puts BOS before an encoded text: as tokenizer.json's post-processor does (Llama 3's
        adds `<|begin_of_text|>`, Llama 2's and Gemma's their `<s>`/`<bos>`; transformers 5 ignores
        tokenizer_config.json's `add_bos_token` when there is a tokenizer.json)."""
        self.tok.encode_special_tokens = True
        return self.tok.encode("a", add_special_tokens=True).ids[:1] == [self.bos_id]

    @staticmethod
    def _template(files: dict[str, bytes], config: dict) -> str | None:
        if HF_TEMPLATE in files:
            return files[HF_TEMPLATE].decode()
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template

    def encode(self, texts: list[str], num_threads: int = -1) -> list[list[int]]:
        self.tok.encode_special_tokens = True  # a special token's text in a document is text, as in SentencePiece
        if num_threads == 1:
            return [self.tok.encode(t, add_special_tokens=False).ids for t in texts]
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def encode_rendered(self, text: str) -> list[int]:
        self.tok.encode_special_tokens = False  # the template's special tokens are tokens
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def special_strings(self) -> list[str]:
        return self.specials

    def token_string(self, token_id: int) -> str:
        return self.tok.id_to_token(token_id)

    @functools.cached_property
    def _byte_level(self) -> bool:
        return '"ByteLevel"' in json.dumps(json.loads(self.files[HF_FILE]).get("decoder"))

    def _bytes_of(self, token_id: int) -> int:
        """By the decoder's convention: byte-level BPE (GPT-2, Llama 3) spells each byte as one character;
        SentencePiece-style files (Llama 2, Mistral) use '▁' for a space and <0xNN> for a byte fallback."""
        added = self._added.get(token_id)
        if added is not None:
            return 0 if added.special else len(added.content.encode())
        piece = self.tok.id_to_token(token_id)
        if piece is None:
            return 0
        if self._byte_level:
            return len(piece)
        if BYTE_PIECE.fullmatch(piece):
            return 1
        return len(piece.replace(SPACE_MARKER, " ").encode())


def load_tokenizer(files: dict[str, bytes] | bytes, where: str = "tokenizer") -> Tokenizer:
    """A tokenizer from its files (or the bytes of a SentencePiece model)."""
    if isinstance(files, bytes):
        files = {SP_FILE: files}
    if HF_FILE in files:
        return HFTokenizer(files, where)
    if SP_FILE in files:
        return SentencePieceTokenizer(files[SP_FILE], where)
    raise DataError(f"{where} holds no {SP_FILE} or {HF_FILE}")


def read_tokenizer_files(path: str) -> dict[str, bytes]:
    """The files of the tokenizer at `path` (local or s3://; every command names it --tokenizer): a SentencePiece
    .model, a Hugging Face tokenizer.json, or a folder holding either (a Hugging Face model folder, a raylm dataset or
    run directory)."""
    try:
        if storage.is_file(path):
            if path.endswith(".json"):
                folder = storage.parent(path)
                files = {HF_FILE: storage.read_bytes(path)}
                return {**files, **_present(folder, (HF_CONFIG, HF_TEMPLATE))}
            return {SP_FILE: storage.read_bytes(path)}
        found = _present(path, TOKENIZER_FILES)
    except OSError as exc:
        raise StorageError(storage.describe_os_error(exc, path)) from None
    if HF_FILE in found:
        return {k: v for k, v in found.items() if k != SP_FILE}
    if SP_FILE in found:
        return {SP_FILE: found[SP_FILE]}
    raise DataError(f"--tokenizer {path} does not exist or holds no {SP_FILE} or {HF_FILE}; pass a SentencePiece "
                    ".model, a Hugging Face tokenizer.json or a folder holding one")


def _present(folder: str, names: Iterable[str]) -> dict[str, bytes]:
    out = {}
    for name in names:
        path = storage.join(folder, name)
        if storage.is_file(path):
            out[name] = storage.read_bytes(path)
    return out


def write_tokenizer_files(files: dict[str, bytes], folder: str) -> None:
    for name, data in files.items():
        storage.write_bytes(storage.join(folder, name), data)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (halves shard size and I/O), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)
