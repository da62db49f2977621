"""The `genarm-vllm` command line: one sub-command per job."""

from __future__ import annotations

import argparse
import sys


def cmd_env(args: argparse.Namespace) -> int:
    """Print the versions and the device genarm-vllm will run on."""
    import platform

    import torch
    import transformers

    from genarm_vllm import __version__

    print(f"genarm-vllm   {__version__}")
    print(f"python        {platform.python_version()}")
    print(f"torch         {torch.__version__}")
    print(f"transformers  {transformers.__version__}")
    try:
        import vllm

        print(f"vllm          {vllm.__version__}")
    except ImportError:
        print("vllm          not installed (pip install 'genarm-vllm[cpu]' or '[gpu]')")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        print(f"device        cuda ({torch.cuda.device_count()} x {names})")
    else:
        import os

        print(f"device        cpu ({os.cpu_count()} cores)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genarm-vllm",
        description="GenARM reward-guided decoding (autoregressive reward models) on vLLM.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("env", help="print versions and the device").set_defaults(func=cmd_env)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # user errors: one clear line, non-zero exit
        print(f"genarm-vllm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
