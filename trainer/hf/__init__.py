"""raylm ⇄ Hugging Face folders (moved from trainer/hf.py and trainer/hf_shards.py)."""

from trainer.hf.config import export, import_folder, model_config_from_hf, read_config
from trainer.hf.safetensors import load_hf_weights

__all__ = ["export", "import_folder", "load_hf_weights", "model_config_from_hf", "read_config"]
