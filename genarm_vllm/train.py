"""Training autoregressive reward models (ARMs) from preference pairs: `genarm-vllm train-arm`."""


def add_cli(subparsers) -> None:
    """Register the train-arm sub-command (placeholder until ARM training lands)."""
