"""Loading model weights for inference and export: a raylm run/checkpoint directory, a Hugging Face folder or a
raylm weights file (`.pt`).

A raylm weights file holds the ModelConfig, the state dict and the tokenizer's files, so it is enough on its own to
generate text, chat or export.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from dataclasses import dataclass

import torch

from raylm import storage
from raylm.errors import DataError
from raylm.tokenizer import SP_FILE, Tokenizer, load_tokenizer, read_tokenizer_files
from trainer import checkpoint
from trainer.model.config import ModelConfig
from trainer.model.transformer import Transformer

FORMAT = "raylm-weights-v1"


@dataclass
class Weights:
    cfg: ModelConfig
    state: dict[str, torch.Tensor]
    tokenizer: dict[str, bytes] | None
    """The tokenizer's files (raylm.tokenizer), when known."""

    def model(self) -> Transformer:
        with torch.device("meta"):
            model = Transformer(self.cfg)
        model.load_state_dict(self.state, assign=True)
        model.init_buffers()
        return model.eval()


NOT_A_TORCH_FILE = (pickle.UnpicklingError, EOFError, KeyError, RuntimeError, ValueError)
"""What torch.load raises for a file it cannot read as a torch save (a text file: KeyError; a foreign zip:
RuntimeError; an empty file: EOFError; a pickle of other objects: UnpicklingError)."""


def tokenizer_files_in(folder: str) -> dict[str, bytes] | None:
    """The tokenizer files of a run directory or Hugging Face folder, or None when it has none."""
    try:
        return read_tokenizer_files(folder)
    except DataError:
        return None


def tokenizer_in(folder: str) -> Tokenizer | None:
    """The tokenizer of a run directory or Hugging Face folder, or None when it has none."""
    files = tokenizer_files_in(folder)
    return None if files is None else load_tokenizer(files, where=folder)


def same_vocabulary(a: Tokenizer, b: Tokenizer) -> bool:
    """Whether a token id means the same text under both tokenizers, so weights trained on ids of one can learn
    from ids of the other.

    The rule: the same files (sha256, the identity a dataset manifest and a checkpoint record), or else the same
    number of tokens and the same token string at every id. The second case admits what only looks different: a
    re-saved tokenizer.json, a base model's tokenizer beside its instruct variant's (another chat template or
    tokenizer_config.json), a SentencePiece model with other merge scores. Whether documents start with BOS is the
    data's format, checked apart (`trainer.train.check_tokenizer`)."""
    if a.sha256 == b.sha256:
        return True
    return a.vocab_size == b.vocab_size and all(a.token_string(i) == b.token_string(i) for i in range(a.vocab_size))


def describe_tokenizer(tokenizer: Tokenizer) -> str:
    return f"{tokenizer.kind} tokenizer of {tokenizer.vocab_size:,} tokens, sha256 {tokenizer.sha256[:12]}…"


def check_data_tokenizer(dataset, weights: str, tokenizer: Tokenizer | None, *, recorded_sha256: str | None = None,
                         option: str) -> None:
    """Refuse, in one line naming both tokenizers, a dataset whose token ids mean other text than they meant to the
    weights of `weights` (`same_vocabulary`): training on it would go on without a word and learn nothing the
    weights knew. `tokenizer`: the one the weights were trained with (a Hugging Face folder's own, or the one a run
    directory keeps of the data it trained on); `recorded_sha256`: its identity as the checkpoint records it, for a
    run directory that kept no tokenizer files. Nothing known (a Hugging Face folder without tokenizer files): only
    the vocabulary's size is checked, by the caller."""
    data_sha = dataset.manifest["tokenizer"]["sha256"]
    if data_sha in (recorded_sha256, tokenizer and tokenizer.sha256):
        return
    if tokenizer is None and recorded_sha256 is None:
        return
    ours = dataset.tokenizer()
    if tokenizer is not None and same_vocabulary(ours, tokenizer):
        return
    theirs = describe_tokenizer(tokenizer) if tokenizer else f"tokenizer sha256 {recorded_sha256[:12]}…"
    raise DataError(f"dataset {dataset.directory} was made with another tokenizer ({describe_tokenizer(ours)}) than "
                    f"the weights of {option}={weights} were trained with ({theirs}); make the data again with the "
                    f"weights' tokenizer: python -m dataprep --tokenizer {weights} ...")


def save_weights(path: str, weights: Weights) -> None:
    torch.save({"format": FORMAT, "model": dataclasses.asdict(weights.cfg), "state_dict": weights.state,
                "tokenizer": weights.tokenizer}, path)


def load_weights(path: str) -> Weights:
    """Weights from a raylm run or checkpoint directory, a Hugging Face folder (config.json; both local or s3://) or
    a raylm `.pt` weights file."""
    if checkpoint.is_checkpoint_path(path):
        step = checkpoint.resolve(path)
        cfg, state = checkpoint.read_model(step)
        return Weights(cfg, state, tokenizer_files_in(checkpoint.run_dir_of(step)))
    if os.path.isdir(path) or storage.exists(storage.join(path, "config.json")):
        from trainer.hf import import_folder

        cfg, state = import_folder(path)
        return Weights(cfg, state, tokenizer_files_in(path))
    if not os.path.isfile(path):
        raise DataError(f"checkpoint {path} does not exist; pass a run or checkpoint directory, a Hugging Face folder "
                        "or a raylm .pt weights file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except NOT_A_TORCH_FILE as exc:
        raise DataError(f"{path} is not a raylm weights file ({type(exc).__name__})") from None
    except OSError as exc:
        raise DataError(f"{path} cannot be read ({exc.strerror or exc}); check the path and its permissions") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DataError(f"{path} is not a raylm weights file (expected format {FORMAT})")
    tokenizer = data.get("tokenizer")
    if isinstance(tokenizer, bytes):  # files written before Hugging Face tokenizers: a SentencePiece model
        tokenizer = {SP_FILE: tokenizer}
    return Weights(ModelConfig(**data["model"]), data["state_dict"], tokenizer)
