"""GenARM reward-guided decoding on vLLM."""

__version__ = "0.1.0"
