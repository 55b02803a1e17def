"""Loading model weights for inference and export: a raylm run/checkpoint directory, a Hugging Face folder or a
raylm weights file (`.pt`).

A raylm weights file holds the ModelConfig, the state dict and the SentencePiece model bytes, so it is enough on
its own to generate text or export.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from dataclasses import dataclass

import torch

from raylm import storage
from raylm.errors import DataError
from trainer import checkpoint
from trainer.model import ModelConfig, Transformer

FORMAT = "raylm-weights-v1"


@dataclass
class Weights:
    cfg: ModelConfig
    state: dict[str, torch.Tensor]
    tokenizer: bytes | None
    """SentencePiece model bytes, when known."""

    def model(self) -> Transformer:
        with torch.device("meta"):
            model = Transformer(self.cfg)
        model.load_state_dict(self.state, assign=True)
        model.init_buffers()
        return model.eval()


NOT_A_TORCH_FILE = (pickle.UnpicklingError, EOFError, KeyError, RuntimeError, ValueError)
"""What torch.load raises for a file it cannot read as a torch save (a text file: KeyError; a foreign zip:
RuntimeError; an empty file: EOFError; a pickle of other objects: UnpicklingError)."""


def read_tokenizer(path: str) -> bytes:
    """The bytes of a SentencePiece model file named on a command line."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise DataError(f"cannot read tokenizer {path}: {exc.strerror}") from None


def save_weights(path: str, weights: Weights) -> None:
    torch.save({"format": FORMAT, "model": dataclasses.asdict(weights.cfg), "state_dict": weights.state,
                "tokenizer": weights.tokenizer}, path)


def load_weights(path: str) -> Weights:
    """Weights from a raylm run or checkpoint directory (local or s3://), a Hugging Face folder (config.json) or a
    raylm `.pt` weights file."""
    if checkpoint.is_checkpoint_path(path):
        step = checkpoint.resolve(path)
        cfg, state = checkpoint.read_model(step)
        sp_path = storage.join(checkpoint.run_dir_of(step), "tokenizer.model")
        return Weights(cfg, state, storage.read_bytes(sp_path) if storage.exists(sp_path) else None)
    if os.path.isdir(path):
        from trainer.hf import import_folder

        cfg, state = import_folder(path)
        sp_path = os.path.join(path, "tokenizer.model")
        return Weights(cfg, state, read_tokenizer(sp_path) if os.path.exists(sp_path) else None)
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
    return Weights(ModelConfig(**data["model"]), data["state_dict"], data.get("tokenizer"))
