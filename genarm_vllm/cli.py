"""The `genarm-vllm` command line: one sub-command per job."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The batch job's own definitions (a light module: no vLLM, torch or transformers).
from genarm_vllm.jobs.batch import ON_ERROR, REORDER_BUFFER


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

        from genarm_vllm.runtime import cpu_flags

        print(f"device        cpu ({os.cpu_count()} cores; {' '.join(cpu_flags()) or 'no AVX2'})")
    return 0


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True,
                        help="base model folder, or a bundle folder from `genarm-vllm pack`")
    parser.add_argument("--reward-model", action="append", default=None, metavar="PATH",
                        help="reward model (ARM) folder, or 'self' (the base as its own guide, for CFG "
                             "with per-request prompts); repeat for several (order = weights order)")
    parser.add_argument("--beta", type=float, default=None,
                        help="default beta > 0; smaller = stronger guidance (default 1.0)")
    parser.add_argument("--weights", type=parse_weights, default=None,
                        help="default weight per reward model, comma separated (default 1 each)")
    add_own_chat_templates_flag(parser)


def add_own_chat_templates_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--own-chat-templates", action=argparse.BooleanOptionalAction, default=None,
        help="chat requests (\"messages\"): each reward model renders the messages with its "
        "own tokenizer's chat template instead of reading the base's rendering (\"self\" and "
        "LoRA reward models read the base's); default: the bundle's setting, else off")


def parse_weights(text: str) -> list[float]:
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def parse_engine_flags(vllm_args: list[str]) -> dict:
    """vLLM engine flags (as `vllm serve` takes them) -> the LLM(...) kwargs they change."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="genarm-vllm (vLLM engine flags)")
    EngineArgs.add_cli_args(parser)
    given = parser.parse_args([*vllm_args, "--model", "unused"])
    default = parser.parse_args(["--model", "unused"])
    return {
        f.name: getattr(given, f.name)
        for f in dataclasses.fields(EngineArgs)
        if f.name != "model"
        and hasattr(given, f.name)
        and getattr(given, f.name) != getattr(default, f.name)
    }


def cmd_pack(args: argparse.Namespace) -> int:
    from genarm_vllm.bundle import pack

    out = pack(args.base, args.reward_model or [], args.out, beta=1.0 if args.beta is None else args.beta,
               weights=args.weights, own_chat_templates=bool(args.own_chat_templates))
    print(f"wrote GenARM bundle {out}: load it with vllm.LLM({str(out)!r}) or `genarm-vllm serve {out}`")
    return 0


RAY_FLAGS = ("replicas", "address", "gpus_per_replica", "cpus_per_replica", "chunk_size")


def ray_only_options(args: argparse.Namespace) -> dict:
    """The Ray flags given; without --ray: an error naming them, but --chunk-size alone is
    ignored with a warning (scripts from the chunked single-process job pass it)."""
    ray_options = {name: getattr(args, name) for name in RAY_FLAGS
                   if getattr(args, name, None) is not None}
    if args.ray:
        return ray_options
    if ray_options.pop("chunk_size", None) is not None:
        print("genarm-vllm generate: warning: --chunk-size ignored: it sets the rows per Ray "
              "batch and applies with --ray only; without --ray the job feeds rows to the "
              "engine continuously, with no chunks", file=sys.stderr)
    if ray_options:
        flags = ", ".join("--" + name.replace("_", "-") for name in ray_options)
        raise ValueError(f"{flags}: {'these apply' if len(ray_options) > 1 else 'applies'} "
                         "only with --ray; add --ray to run the job on a Ray cluster, or "
                         "drop them")
    return {}


def checked_reward_model_count(args: argparse.Namespace, weights, weights_flag: str) -> int:
    """How many reward models a job's --reward-model flags (or its bundle) name; its default
    weights checked against that count."""
    from genarm_vllm.guidance import check_weights, read_bundle

    bundle = read_bundle(args.base)
    num_reward_models = len(args.reward_model or (bundle or {}).get("genarm_reward_models") or [])
    if not num_reward_models:
        raise ValueError("give at least one --reward-model (or a bundle as --base)")
    if weights is not None:
        check_weights(weights, num_reward_models, weights_flag)
    return num_reward_models


def cmd_generate(args: argparse.Namespace, vllm_args: list[str]) -> int:
    from genarm_vllm.jobs.batch import input_files, prepare_job
    from genarm_vllm.jobs.fingerprint import job_settings

    num_reward_models = checked_reward_model_count(args, args.weights, "--weights")
    ray_options = ray_only_options(args)
    files = input_files(args.input)
    vllm_kwargs = parse_engine_flags(vllm_args)
    from vllm import SamplingParams

    sampling_params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos,
    )
    settings = job_settings(args.base, args.reward_model, args.beta, args.weights,
                            sampling_params, vllm_kwargs, args.own_chat_templates)
    # Bad rows (with --on-error fail), flags and changed settings fail before the (slow)
    # engine start. One pass over the input finds all the job needs (the job reads it once
    # more, generating).
    prepared = prepare_job(Path(args.output), settings, files, num_reward_models,
                           overwrite=args.overwrite, check_rows=args.on_error == "fail")
    total = prepared.total
    if prepared.finished:
        print(f"{args.output} already holds all {total} rows; nothing to do")
        return 0
    job_options = dict(settings=settings, prepared=prepared, on_error=args.on_error,
                       reorder_buffer=args.reorder_buffer)
    if args.ray:
        from genarm_vllm.jobs.ray_job import run_ray_job

        summary = run_ray_job(
            args.base, args.reward_model, args.input, args.output, sampling_params,
            beta=args.beta, weights=args.weights, vllm_kwargs=vllm_kwargs,
            own_chat_templates=args.own_chat_templates, **job_options, **ray_options,
        )
    else:
        from genarm_vllm.engine.llm import GuidedLLM
        from genarm_vllm.jobs.batch import run_job

        llm = GuidedLLM(args.base, args.reward_model, beta=args.beta, weights=args.weights,
                        own_chat_templates=args.own_chat_templates, **vllm_kwargs)
        summary = run_job(llm, args.input, args.output, sampling_params, **job_options)
    print(summary.report())
    print(f"wrote {summary.rows_written} rows to {args.output} ({total} in all)")
    return 0


def cmd_serve(args: argparse.Namespace, vllm_args: list[str]) -> int:
    from genarm_vllm.serve import serve

    model = args.base
    if vllm_args and not vllm_args[0].startswith("-"):
        if model is not None:
            raise ValueError(f"give a bundle ({vllm_args[0]}) or --base, not both")
        model = vllm_args.pop(0)
    if model is None:
        raise ValueError("give a bundle folder as the first argument, or --base and --reward-model")
    serve(model, args.reward_model, args.beta, args.weights, vllm_args, args.own_chat_templates)
    return 0  # not reached: serve() execs the vLLM server


def cmd_train_arm(args: argparse.Namespace) -> int:
    from genarm_vllm.training import train_arm
    from genarm_vllm.training.options import METRICS_FILE, options_from_args

    metrics = train_arm(args.init, args.data, args.out, recipe=args.recipe,
                        **options_from_args(args))
    summary = ""
    if metrics["eval"]:
        first, last = metrics["eval"][0], metrics["eval"][-1]
        summary = (f"; held-out accuracy {first['accuracy']:.3f} -> {last['accuracy']:.3f}, "
                   f"mean margin {first['mean_margin']:.3f} -> {last['mean_margin']:.3f}")
    lora_adapter = metrics["args"]["mode"] == "lora" and not metrics["args"]["merge"]
    print(f"wrote {'LoRA adapter ARM' if lora_adapter else 'ARM'} {args.out}{summary} "
          f"(metrics: {Path(args.out) / METRICS_FILE})")
    if metrics["truncated_pairs"]:
        print(f"note: {metrics['truncated_pairs']} pair(s) had a response cut at --max-length "
              f"{metrics['args']['max_length']}")
    if metrics["adapter_dir"] and not lora_adapter:
        print(f"wrote LoRA adapter {metrics['adapter_dir']}")
    return 0


def add_train_arm_parser(sub) -> None:
    """The train-arm sub-command. Option defaults are unset (None) so that cmd_train_arm
    passes only the flags given: they override --recipe, which overrides TrainOptions."""
    from genarm_vllm.training.options import (
        ADAPTER_DIR,
        CHECKPOINT_DIR,
        DEFAULT_LR,
        DEVICES,
        METRICS_FILE,
        MODES,
        PRECISIONS,
        RECIPES,
        REPORT_TO,
        SCHEDULERS,
        TrainOptions,
    )

    d = TrainOptions()
    p = sub.add_parser(
        "train-arm", help="train an autoregressive reward model (ARM) from preference pairs",
        description="Train a GenARM autoregressive reward model (transformers.Trainer): loss "
        "-log sigmoid(beta_r * (sum_t log pi(chosen_t) - sum_t log pi(rejected_t)) - gamma) over "
        "response tokens (summed, prompt masked, no reference model). Rows: {\"prompt\", "
        "\"chosen\", \"rejected\"} strings, chosen/rejected chat message lists (UltraFeedback), "
        "or HH-RLHF conversations. Multi-GPU: `accelerate launch -m genarm_vllm.cli train-arm "
        "... [--deepspeed launch/ds_zero3.json]`. The ARM folder carries the tokenizer and "
        f"{METRICS_FILE}; it is a full model folder, or in lora mode a PEFT adapter folder "
        "(adapter_config.json, adapter_model.safetensors) that the engine serves on the base's "
        "own weights as a LoRA ARM (--merge for a full folder instead).",
    )

    def add(group, flag, help, **kwargs):
        name = flag.lstrip("-").replace("-", "_")
        default = getattr(d, name, None)
        shown = ",".join(default) if isinstance(default, tuple) else default
        group.add_argument(flag, default=None, help=f"{help} (default {shown})", **kwargs)

    p.add_argument("--init", required=True,
                   help="causal LM folder the ARM starts from (the base itself, or a smaller "
                   "competent LM with the same tokenizer)")
    p.add_argument("--data", required=True,
                   help="JSONL file of preference rows, or a local Hugging Face datasets folder "
                   "(save_to_disk; split train or train_prefs)")
    p.add_argument("--out", required=True,
                   help="ARM folder to write (lora mode: the adapter folder, unless --merge)")
    p.add_argument("--base", default=None,
                   help="base model folder the ARM will guide: checks the tokenizers agree")
    p.add_argument("--recipe", choices=list(RECIPES), default=None,
                   help="the paper's hyperparameters: hh (LoRA r8/a16 q,k,v, beta_r 0.05, lr 5e-4, "
                   "1 epoch, 32 pairs/step, QLoRA on a GPU), ultrafeedback (full, beta_r 0.1, lr "
                   "5e-7, 3 epochs), pku-help / pku-harm (LoRA, beta_r 0.5 / 0.01); any flag "
                   "overrides them")
    g = p.add_argument_group("objective and schedule")
    add(g, "--beta-r", "loss scale beta_r", type=float)
    add(g, "--gamma", "loss margin gamma", type=float)
    add(g, "--epochs", "passes over the training pairs", type=int)
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: " +
                   ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items()) + ")")
    add(g, "--batch-size", "pairs per forward pass and process", type=int)
    add(g, "--grad-accum", "forward passes per optimizer step", type=int)
    add(g, "--max-length", "tokens per prompt + response; longer responses are cut", type=int)
    add(g, "--eval-fraction", "share of pairs held out for accuracy / margin", type=float)
    add(g, "--seed", "data split, order, LoRA init", type=int)
    add(g, "--lr-scheduler", "learning-rate schedule", choices=SCHEDULERS)
    add(g, "--warmup-ratio", "share of steps warming up", type=float)
    add(g, "--warmup-steps", "warmup steps instead of --warmup-ratio (0: use the ratio)", type=int)
    add(g, "--weight-decay", "AdamW weight decay", type=float)
    add(g, "--max-grad-norm", "gradient clipping", type=float)
    g = p.add_argument_group("what trains")
    add(g, "--mode", "all weights, LoRA adapters (saved as the adapter; see --merge), or the top "
        "--top-layers decoder layers + final norm", choices=MODES)
    add(g, "--top-layers", "decoder layers trained in top-layers mode", type=int, metavar="K")
    add(g, "--lora-r", "LoRA rank", type=int)
    add(g, "--lora-alpha", "LoRA alpha", type=float)
    add(g, "--lora-dropout", "LoRA dropout", type=float)
    add(g, "--lora-targets", "modules LoRA adapts, comma separated")
    add(g, "--load-in-4bit", "QLoRA: 4-bit base weights (needs a CUDA GPU and bitsandbytes; hh "
        "recipe: on when both are present)", action=argparse.BooleanOptionalAction)
    add(g, "--merge", "lora mode: write the ARM folder as a full model with the adapter merged "
        "in (float32; loads --init whole on the CPU) instead of the adapter folder. Needed when "
        "--init is not the base the ARM will guide (the engine runs a LoRA adapter on the "
        "base's weights) or to serve it with tensor parallelism", action="store_true")
    g.add_argument("--save-adapter", nargs="?", const=True, default=None, metavar="DIR",
                   help=f"with --merge: also keep the adapter alone (default DIR: ARM_DIR/{ADAPTER_DIR}); "
                   "rebuild the merged ARM from it with genarm_vllm.training.merge_adapter")
    g.add_argument("--chat-template", action="store_true", default=None,
                   help="render plain prompts with the tokenizer's chat template (one user "
                   "message); chat-message rows always use it")
    g = p.add_argument_group("hardware, checkpoints, logging (transformers.Trainer)")
    add(g, "--device", "auto picks a CUDA GPU when one is visible", choices=DEVICES)
    add(g, "--precision", "mixed precision (float32 master weights)", choices=PRECISIONS)
    add(g, "--gradient-checkpointing", "recompute activations in backward (less memory)",
        action="store_true")
    add(g, "--deepspeed", "DeepSpeed config file, e.g. launch/ds_zero3.json (with accelerate launch)")
    add(g, "--eval-steps", "held-out metrics every N optimizer steps (0: after each epoch)", type=int)
    add(g, "--save-steps", "a checkpoint every N optimizer steps (0: none)", type=int)
    add(g, "--save-total-limit", "checkpoints kept", type=int)
    add(g, "--checkpoint-dir", f"where checkpoints go (None: ARM_DIR/{CHECKPOINT_DIR})")
    add(g, "--keep-checkpoints", "keep the checkpoints after the run finishes", action="store_true")
    g.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                   help="continue an interrupted run from its latest checkpoint (or CHECKPOINT)")
    add(g, "--logging-steps", "log the training loss every N steps", type=int)
    add(g, "--report-to", "logging backend", choices=REPORT_TO)
    g.add_argument("--trainer-arg", dest="trainer_args", action="append", default=None,
                   metavar="KEY=VALUE",
                   help="any further transformers.TrainingArguments field, VALUE as JSON or a "
                   "string (repeat), e.g. --trainer-arg optim=adafactor")
    p.set_defaults(func=cmd_train_arm)


# ----------------------------------------------------------------------------- research:
# sweep (a grid of guidance settings as one batch job), score (reward models), report


def add_job_flags(p: argparse.ArgumentParser) -> None:
    """The batch-job flags `sweep` shares with `generate` (same meaning, same defaults),
    its Ray group included."""
    p.add_argument("--input", required=True,
                   help="input JSONL: a file, a folder of *.jsonl shards, or a quoted glob")
    p.add_argument("--output", required=True, help="output JSONL (appended to when resuming)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per completion (128)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="on the mixed scores; 0 = greedy (1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (0 = off)")
    p.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens")
    p.add_argument("--on-error", choices=ON_ERROR, default=ON_ERROR[0],
                   help="a row that cannot be generated (bad JSON or guidance, a prompt too "
                   "long, an id a model cannot embed, a row vLLM refuses): continue = write it "
                   "as an error row (input fields + \"error\") and go on (default); fail = "
                   "stop at the first one")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh: delete the output and its settings file (default: resume "
                   "an interrupted job, refused if its settings differ)")
    p.add_argument("--reorder-buffer", type=int, default=REORDER_BUFFER, metavar="ROWS",
                   help="finished rows that may wait for an earlier, longer one before the "
                   f"engine stops taking new rows (memory bound of the ordered output; "
                   f"{REORDER_BUFFER})")
    ray = p.add_argument_group(
        "Ray", "run the job on a Ray cluster: an actor pool of engines (pip install "
        "'genarm-vllm[ray]'); tensor-parallel engines across GPUs/nodes: add the vLLM flags "
        "--tensor-parallel-size N --distributed-executor-backend ray")
    ray.add_argument("--ray", action="store_true", help="run through Ray Data")
    ray.add_argument("--replicas", type=int, default=None,
                     help="engines (Ray actors) running at once (1)")
    ray.add_argument("--address", default=None,
                     help="Ray cluster to join, e.g. auto or HEAD_IP:6379 (default: $RAY_ADDRESS, "
                     "else a new local Ray)")
    ray.add_argument("--gpus-per-replica", type=int, default=None,
                     help="GPUs per engine (default: --tensor-parallel-size on a cluster with "
                     "GPUs, else 0)")
    ray.add_argument("--cpus-per-replica", type=float, default=None,
                     help="CPUs Ray reserves per engine (1)")
    ray.add_argument("--chunk-size", type=int, default=None,
                     help="rows per Ray batch (512); small jobs are split so every replica "
                     "gets work")


def cmd_sweep(args: argparse.Namespace, vllm_args: list[str]) -> int:
    from genarm_vllm.jobs import sweep
    from genarm_vllm.jobs.batch import count_rows, input_files, prepare_output
    from genarm_vllm.jobs.fingerprint import job_settings

    num_reward_models = checked_reward_model_count(args, args.default_weights, "--default-weights")
    settings = sweep.read_settings_file(args.settings) if args.settings else []
    if args.betas or args.weights:
        settings += sweep.grid(sweep.parse_betas(args.betas) if args.betas else None,
                               sweep.parse_weight_grid(args.weights) if args.weights else None)
    settings = sweep.check_settings(settings, num_reward_models)
    ray_options = {name: getattr(args, name) for name in RAY_FLAGS
                   if getattr(args, name, None) is not None}
    if ray_options and not args.ray:
        raise ValueError("--replicas, --address, ... only apply with --ray")
    expanded = Path(args.expanded) if args.expanded else sweep.expanded_path_for(args.output)
    rows = sweep.write_expanded(args.input, settings, expanded)  # checks the input rows
    files = input_files(expanded)
    if args.on_error == "fail":
        from genarm_vllm.jobs.batch import check_input

        check_input(expanded, num_reward_models)
    vllm_kwargs = parse_engine_flags(vllm_args)
    from vllm import SamplingParams

    sampling_params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos,
    )
    fingerprint = sweep.sweep_settings(
        job_settings(args.base, args.reward_model, args.default_beta, args.default_weights,
                     sampling_params, vllm_kwargs, args.own_chat_templates), settings)
    _, done = prepare_output(Path(args.output), fingerprint, files, num_reward_models,
                             overwrite=args.overwrite)
    total = count_rows(files)
    print(f"sweep: {len(settings)} settings, {rows} rows ({expanded})")
    if done == total:
        expanded.unlink(missing_ok=True)
        print(f"{args.output} already holds all {total} rows; nothing to do")
        return 0
    job_options = dict(on_error=args.on_error, reorder_buffer=args.reorder_buffer)
    if args.ray:
        from genarm_vllm.jobs.ray_job import run_ray_job

        summary = run_ray_job(
            args.base, args.reward_model, expanded, args.output, sampling_params,
            beta=args.default_beta, weights=args.default_weights, vllm_kwargs=vllm_kwargs,
            own_chat_templates=args.own_chat_templates, settings=fingerprint, **job_options,
            **ray_options)
        report = summary.report()
        expanded.unlink(missing_ok=True)
    else:
        from genarm_vllm.engine.llm import GuidedLLM

        llm = GuidedLLM(args.base, args.reward_model, beta=args.default_beta,
                        weights=args.default_weights, own_chat_templates=args.own_chat_templates,
                        **vllm_kwargs)
        result = sweep.run_sweep(llm, args.input, args.output, sampling_params, settings,
                                 job_settings=fingerprint, expanded_path=expanded, **job_options)
        summary, report = result.job, result.report()
    print(report)
    print(f"wrote {summary.rows_written} rows to {args.output} ({total} in all)")
    return 0


def add_sweep_parser(sub) -> None:
    p = sub.add_parser(
        "sweep", help="every prompt under a grid of guidance settings, as one batch job",
        allow_abbrev=False,
        description="Run every input row (as `generate` takes them) under every setting of a "
        "grid of guidance settings (--betas x --weights, and/or --settings FILE), as one "
        "batch job on one engine: rows prompt-major (all settings of a prompt together, "
        "so the prompt is prefilled once and shared through vLLM's prefix cache). Output "
        "rows: the input fields plus \"setting\", \"beta\", \"weights\", \"temperature\", "
        "\"prompt_index\" and "
        "what `generate` writes; errors, order, resume, fingerprint and --ray as in "
        "`generate`. Any further flags are vLLM engine flags.")
    p.add_argument("--base", required=True, help="base model folder, or a bundle folder")
    p.add_argument("--reward-model", action="append", default=None, metavar="PATH",
                   help="reward model (ARM) folder; repeat for several (order = weights order)")
    p.add_argument("--betas", default=None, help='betas of the grid, e.g. "1,0.5"')
    p.add_argument("--weights", default=None,
                   help='weight lists of the grid, ";" between settings, e.g. "1,0;0.5,0.5;0,1"')
    p.add_argument("--settings", default=None, metavar="FILE",
                   help='a JSON list (or JSONL) of {"name", "beta", "weights", "temperature"} '
                   "settings (each field optional; temperature: the setting's own sampling "
                   "temperature instead of --temperature), run before the --betas x --weights grid")
    p.add_argument("--default-beta", type=float, default=None,
                   help="the engine's beta, for settings without one (1.0)")
    p.add_argument("--default-weights", type=parse_weights, default=None,
                   help="the engine's weights, for settings without them (1 each)")
    add_own_chat_templates_flag(p)
    p.add_argument("--expanded", default=None, metavar="PATH",
                   help="where the expanded rows go (default OUTPUT.sweep-input.jsonl; with "
                   "--ray on several nodes: a path every node reads)")
    add_job_flags(p)
    p.set_defaults(func=cmd_sweep, takes_vllm_args=True)


def cmd_score(args: argparse.Namespace, vllm_args: list[str]) -> int:
    from genarm_vllm.jobs import score

    templates = score.parse_templates(args.template)
    scorers = [score.parse_scorer(s, templates) for s in args.scorer or []]
    scorers += [score.parse_arm_scorer(s) for s in args.arm_scorer or []]
    unknown = set(templates) - {s.name for s in scorers if s.kind == "classifier"}
    if unknown:
        raise ValueError(f"--template for {', '.join(sorted(unknown))}: no such --scorer")
    summary = score.score_job(args.input, args.output, scorers,
                              engine_kwargs=parse_engine_flags(vllm_args),
                              overwrite=args.overwrite, chunk_rows=args.chunk_rows)
    if not summary.scorers and not summary.rows_scored and not summary.rows_failed:
        print(f"{args.output} is complete; nothing to do")
        return 0
    print(summary.report())
    print(f"wrote {args.output}")
    return 0


def add_score_parser(sub) -> None:
    p = sub.add_parser(
        "score", help="add reward-model scores to generated rows", allow_abbrev=False,
        description="Score generated rows (the output of `generate` or `sweep`) with "
        "sequence-level reward models (*ForSequenceClassification, one label: vLLM's pooling "
        "runner) and/or GenARM ARMs (beta_r x the sum of the response's token log-probs). "
        "Adds \"scores\": {NAME: value} to each row; a row that cannot be scored becomes an "
        "error row. One model in memory at a time; a re-run resumes. Any further flags are "
        "vLLM engine flags for the scorers' engines (e.g. --max-model-len 4096).")
    p.add_argument("--input", required=True, help="generated rows: a JSONL file, folder or glob")
    p.add_argument("--output", required=True, help="scored rows (JSONL)")
    p.add_argument("--scorer", action="append", default=None, metavar="NAME=PATH[:SIGN]",
                   help="a reward model; SIGN -1 for a cost model (lower is better); repeat")
    p.add_argument("--arm-scorer", action="append", default=None,
                   metavar="NAME=PATH[,beta_r=B][,sign=S]",
                   help="an ARM as a scorer: beta_r x sum of the response's token log-probs")
    p.add_argument("--template", action="append", default=None, metavar="NAME=FORMAT",
                   help="what scorer NAME reads, with {prompt} and {response} (default: its "
                   "chat template, else prompt + response), e.g. Beaver's 'BEGINNING OF "
                   "CONVERSATION: USER: {prompt} ASSISTANT:{response}'")
    p.add_argument("--overwrite", action="store_true", help="start afresh")
    p.add_argument("--chunk-rows", type=int, default=256, help="rows per vLLM call (256)")
    p.set_defaults(func=cmd_score, takes_vllm_args=True)


def parse_signs(specs: list[str] | None) -> dict[str, float]:
    signs = {}
    for spec in specs or ():
        name, sep, value = spec.partition("=")
        try:
            signs[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or signs.get(name) not in (1.0, -1.0):
            raise ValueError(f"--sign takes NAME=1 or NAME=-1, got {spec!r}")
    return signs


def cmd_report(args: argparse.Namespace) -> int:
    from genarm_vllm.jobs import report
    from genarm_vllm.jobs.score import read_signs

    signs = {}
    for path in args.input:
        signs.update(read_signs(path))
    signs.update(parse_signs(args.sign))
    pareto = None
    if args.pareto:
        pareto = tuple(s.strip() for s in args.pareto.split(","))
        if len(pareto) != 2:
            raise ValueError(f"--pareto takes two score names, got {args.pareto!r}")
    prefix = args.out or str(Path(args.input[0]).with_suffix("")) + ".report"
    text = report.write_report(
        report.read_rows(args.input), prefix,
        scores=[s.strip() for s in args.scores.split(",")] if args.scores else None,
        pareto=pareto, signs=signs, baseline=args.baseline, win_scorer=args.win_scorer,
        seed=args.seed, resamples=args.resamples)
    print(text)
    return 0


def add_report_parser(sub) -> None:
    p = sub.add_parser(
        "report", help="per-setting means, Pareto front and win rates of scored sweep rows",
        description="Summarise scored sweep rows: per setting the mean of each score with a "
        "bootstrap 95% interval, the Pareto front over two scores (PNG), and win rates "
        "against a baseline setting. Writes PREFIX.md, PREFIX.json, PREFIX.png.")
    p.add_argument("input", nargs="+", help="scored rows (JSONL), from `genarm-vllm score`")
    p.add_argument("--out", default=None, metavar="PREFIX",
                   help="output prefix (default: the first input without .jsonl, + .report)")
    p.add_argument("--scores", default=None, help="scores to report, comma separated (all)")
    p.add_argument("--pareto", default=None, metavar="X,Y",
                   help="the two scores of the Pareto front (default: the first two)")
    p.add_argument("--sign", action="append", default=None, metavar="NAME=-1",
                   help="1: higher is better, -1: lower is better (default: as given to "
                   "`score`, else 1); repeat")
    p.add_argument("--baseline", default=None,
                   help="setting the win rates compare against (default: the first)")
    p.add_argument("--win-scorer", default=None,
                   help="score that decides a win (default: the first)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (2000)")
    p.set_defaults(func=cmd_report)


def add_research_parsers(sub) -> None:
    add_sweep_parser(sub)
    add_score_parser(sub)
    add_report_parser(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genarm-vllm",
        description="GenARM reward-guided decoding (autoregressive reward models) on vLLM.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("env", help="print versions and the device").set_defaults(func=cmd_env)

    p = sub.add_parser("pack", help="write a bundle folder that plain vLLM loads as one model",
                       description="Write a GenARM bundle: the base folder with a rewritten "
                       "config.json, other files symlinked, reward models referenced by path.")
    add_model_args(p)
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser(
        "generate", help="guided batch generation over a JSONL file", allow_abbrev=False,
        description="Guided batch generation. Input rows: {\"prompt\": ...} or "
        "{\"messages\": [...]}, optional \"beta\", \"weights\", \"prompts\" (one per reward "
        "model: the prompt it reads) and \"temperature\". Output rows: the input "
        "fields plus generated_text, generated_token_ids, finish_reason, in input order; a row "
        "that cannot be generated gets an \"error\" field instead. Re-running continues an "
        "interrupted job (refused if the settings changed; --overwrite starts afresh). Any "
        "further flags are vLLM engine flags (e.g. --max-model-len 2048 "
        "--tensor-parallel-size 2 --enforce-eager).",
    )
    add_model_args(p)
    add_job_flags(p)
    p.set_defaults(func=cmd_generate, takes_vllm_args=True)

    p = sub.add_parser(
        "serve", help="vLLM's OpenAI-compatible server with GenARM guidance",
        usage="genarm-vllm serve (BUNDLE | --base B --reward-model R ...) [--beta] [--weights] "
        "[vLLM server flags]", allow_abbrev=False,
        description="Start vLLM's own OpenAI-compatible server on a GenARM model: a bundle "
        "folder (first argument) or --base plus --reward-model. Every other flag is a vLLM "
        "server flag (--host, --port, --max-model-len, --tensor-parallel-size, ...). "
        'Per-request guidance: the body field "vllm_xargs": {"genarm_beta": 0.5, '
        '"genarm_weights": [1.0, 0.3]}.',
    )
    p.add_argument("--base", default=None,
                   help="base model folder (instead of a bundle as first argument)")
    p.add_argument("--reward-model", action="append", default=None, metavar="PATH",
                   help="reward model (ARM) folder; repeat for several (order = weights order)")
    p.add_argument("--beta", type=float, default=None, help="default beta > 0 (bundle's or 1.0)")
    p.add_argument("--weights", type=parse_weights, default=None,
                   help="default weight per reward model, comma separated (bundle's or 1 each)")
    add_own_chat_templates_flag(p)
    p.set_defaults(func=cmd_serve, takes_vllm_args=True)

    add_train_arm_parser(sub)
    add_research_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "takes_vllm_args", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if getattr(args, "takes_vllm_args", False):
            return args.func(args, rest)
        return args.func(args)
    except ValueError as e:  # user errors: one clear message, non-zero exit
        print(f"genarm-vllm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
