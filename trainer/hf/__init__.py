"""raylm ⇄ Hugging Face folders: Llama for dense models, Mixtral for MoE.

Export writes a folder transformers loads with no custom code (`write`); import reads such a folder (e.g. a published
Llama, local or s3://) into a ModelConfig (`config`) and raylm weights (`load`), to continue pretraining, evaluate or
generate. Names and the per-expert layout are mapped in one place (`names`), and every read of weights goes through
one safetensors reader (`safetensors`) that reads only the rows asked for.
"""

from trainer.hf.config import SUPPORTED, hf_config, model_config_from_hf, not_a_folder, read_config
from trainer.hf.load import import_folder, load_hf_weights
from trainer.hf.names import hf_blocks, to_hf_state_dict
from trainer.hf.safetensors import BytesRead, SafetensorsFolder
from trainer.hf.write import export, standard_parametrisation, write_tokenizer

__all__ = ["SUPPORTED", "BytesRead", "SafetensorsFolder", "export", "hf_blocks", "hf_config", "import_folder",
           "load_hf_weights", "model_config_from_hf", "not_a_folder", "read_config", "standard_parametrisation",
           "to_hf_state_dict", "write_tokenizer"]
