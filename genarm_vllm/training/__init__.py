"""Training autoregressive reward models (ARMs) from preference pairs: `genarm-vllm train-arm`
on transformers.Trainer (trainer.py), its options, data, loss and model loading."""

from genarm_vllm.training.models import merge_adapter
from genarm_vllm.training.trainer import train_arm

__all__ = ["merge_adapter", "train_arm"]
