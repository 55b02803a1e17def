"""Llama-style decoder in plain PyTorch: RoPE, grouped-query attention, SwiGLU or top-k MoE, RMSNorm.

No distributed code here: FSDP2, activation checkpointing and compile are applied from outside
(`trainer/parallelize.py`). config.py: the configuration and μP init; attention.py: RoPE, attention kernels, masks
for packed examples, KV cache; transformer.py: the layers and the model; generation.py: decoding.
"""

from trainer.model.config import ModelConfig
from trainer.model.generation import generate
from trainer.model.transformer import Transformer

__all__ = ["ModelConfig", "Transformer", "generate"]
