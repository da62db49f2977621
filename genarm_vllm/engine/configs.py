"""What GenARM reads off a Hugging Face model config, in one place."""

from __future__ import annotations


def text_config(config):
    """The language model's config (a multimodal config's text part, else the config itself)."""
    return getattr(config, "get_text_config", lambda: config)()


def head_size(config) -> int:
    """Attention head size: head_dim where the config states it, else hidden / heads."""
    config = text_config(config)
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
