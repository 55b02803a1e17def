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

from dataprep.tokenizer import SP_FILE, read_tokenizer_files
from raylm.errors import DataError
from trainer import checkpoint
from trainer.model import ModelConfig, Transformer

FORMAT = "raylm-weights-v1"


@dataclass
class Weights:
    cfg: ModelConfig
    state: dict[str, torch.Tensor]
    tokenizer: dict[str, bytes] | None
    """The tokenizer's files (dataprep.tokenizer), when known."""

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


def save_weights(path: str, weights: Weights) -> None:
    torch.save({"format": FORMAT, "model": dataclasses.asdict(weights.cfg), "state_dict": weights.state,
                "tokenizer": weights.tokenizer}, path)


def load_weights(path: str) -> Weights:
    """Weights from a raylm run or checkpoint directory (local or s3://), a Hugging Face folder (config.json) or a
    raylm `.pt` weights file."""
    if checkpoint.is_checkpoint_path(path):
        step = checkpoint.resolve(path)
        cfg, state = checkpoint.read_model(step)
        return Weights(cfg, state, tokenizer_files_in(checkpoint.run_dir_of(step)))
    if os.path.isdir(path):
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
