"""The JSONL batch job on a Ray cluster: `genarm-vllm generate --ray`.

Same input, output and resume semantics as the single-process job (batch_job.py), spread
over an actor pool of GuidedLLM engines with Ray Data:

- the driver reads and validates every row (batch_job.read_rows), skips the rows the
  output already holds (batch_job.completed_rows), and checks the models (tokenizers,
  lengths, heads vs tensor_parallel_size) before any Ray work starts;
- the remaining rows go into a Ray Dataset as (index, row as JSON text): JSON text keeps
  every row exactly as read, whatever its fields, instead of forcing one Arrow schema;
- `map_batches` runs them over `replicas` actors, each holding one GuidedLLM built in
  `__init__`; a batch is one engine call (batch_job.generate_lines, shared with the
  single-process job, so the output lines are the same);
- the driver writes the lines to the one output file in input order as batches arrive,
  flushing after each, so an interrupted run resumes like the single-process job.

Fault tolerance is Ray's own: Ray Data's actor pools restart a dead actor
(max_restarts=-1) and re-run the batches it held (max_task_retries=-1), so a killed
worker neither loses nor duplicates rows; the driver also writes each index once.

Tensor parallelism: each replica is one vLLM engine of tensor_parallel_size GPUs; with
distributed_executor_backend="ray" the replica reserves them as a placement group (one
GPU per bundle), which vLLM's Ray executor picks up for its workers (they may then span
nodes). The reward models are sub-models of the one vLLM model and are sharded with it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from genarm_vllm.batch_job import completed_rows, generate_lines, read_rows
from genarm_vllm.runtime import LOCAL_ENV

# Environment variables the driver passes on to the replicas: the runtime settings of
# runtime.LOCAL_ENV and vLLM switches that change results or memory. Node-specific ones
# (VLLM_HOST_IP, CUDA_VISIBLE_DEVICES, ...) are left to each node.
FORWARDED_ENV = (*LOCAL_ENV, "VLLM_CPU_OMP_THREADS_BIND", "VLLM_USE_V2_MODEL_RUNNER")


class _Replica:
    """One GuidedLLM engine in a Ray actor; called with batches of (index, row JSON)."""

    def __init__(self, base, reward_models, beta, weights, vllm_kwargs, sampling_params):
        from genarm_vllm.engine import GuidedLLM

        self.llm = GuidedLLM(base, reward_models, beta=beta, weights=weights, **vllm_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.sampling_params = sampling_params

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        rows = [json.loads(text) for text in batch["row"]]
        lines = generate_lines(self.llm, rows, self.sampling_params, self.tokenizer)
        return {"index": batch["index"], "line": np.array(lines, dtype=object)}


def check_models(base, reward_models, vllm_kwargs: dict) -> list[str]:
    """The load-time checks GuidedLLM runs, here in the driver, before Ray starts.

    Returns the reward model folders (the given ones, or a bundle's).
    """
    from genarm_vllm.guidance import read_bundle
    from genarm_vllm.validation import check_reward_models, check_tensor_parallel

    reward_models = [str(p) for p in reward_models or []]
    bundle = read_bundle(base)
    if not reward_models and bundle is not None:
        reward_models = list(bundle["genarm_reward_models"])
    tp = vllm_kwargs.get("tensor_parallel_size", 1)
    check_reward_models(str(base), reward_models,
                        max_model_len=vllm_kwargs.get("max_model_len"), tensor_parallel_size=tp,
                        speculative_config=vllm_kwargs.get("speculative_config"),
                        pipeline_parallel_size=vllm_kwargs.get("pipeline_parallel_size", 1))
    # The base is sharded by the same rule as its reward models.
    check_tensor_parallel(str(base), tp, role="base model")
    return reward_models


def replica_resources(vllm_kwargs: dict, cpus_per_replica: float, gpus_per_replica: int,
                      groups: list | None = None) -> dict:
    """map_batches resource arguments for one replica (one engine).

    groups: collects the placement groups made, for the caller to remove after the job.
    """
    if gpus_per_replica and vllm_kwargs.get("distributed_executor_backend") == "ray":
        # vLLM's Ray executor starts one worker per GPU in the placement group the replica
        # runs in (placement_group_capture_child_tasks); the replica itself takes no GPU.
        def placement_group_per_replica():
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            group = placement_group(
                [{"GPU": 1, "CPU": cpus_per_replica}] * gpus_per_replica, strategy="PACK"
            )
            if groups is not None:
                groups.append(group)
            return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
                group, placement_group_capture_child_tasks=True)}

        return {"num_cpus": cpus_per_replica, "num_gpus": 0,
                "ray_remote_args_fn": placement_group_per_replica}
    return {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica}


def run_ray_job(
    base: str | os.PathLike,
    reward_models,
    input_path: str | os.PathLike,
    output_path: str | os.PathLike,
    sampling_params,
    *,
    beta: float | None = None,
    weights=None,
    vllm_kwargs: dict | None = None,
    rows: list[dict] | None = None,
    replicas: int = 1,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: int | None = None,
    address: str | None = None,
    env_vars: dict | None = None,
    chunk_size: int = 512,
    progress: bool = True,
) -> int:
    """Generate for every row not yet in `output_path` on Ray; returns how many rows it added.

    Connects to the cluster at `address` (None: the one named by RAY_ADDRESS, else a new
    local one) unless Ray is already initialized; shuts down only a Ray it started.
    gpus_per_replica None: tensor_parallel_size if the cluster has GPUs, else 0.
    env_vars: extra environment for the replicas (added to the FORWARDED_ENV ones).
    """
    try:
        import ray
    except ImportError:
        raise ValueError("the Ray job needs Ray: pip install 'genarm-vllm[ray]'") from None
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    vllm_kwargs = dict(vllm_kwargs or {})
    reward_models = check_models(base, reward_models, vllm_kwargs)
    output = Path(output_path)
    if rows is None:
        rows = read_rows(input_path, len(reward_models))
    done = completed_rows(output, rows)
    todo = rows[done:]
    if not todo:
        return 0

    started = not ray.is_initialized()
    if started:
        ray.init(address=address)
    groups = []  # placement groups of tensor-parallel replicas: their GPUs are freed at the end
    try:
        if gpus_per_replica is None:
            has_gpus = ray.cluster_resources().get("GPU", 0) > 0
            gpus_per_replica = vllm_kwargs.get("tensor_parallel_size", 1) if has_gpus else 0
        batches = _generate(
            base, reward_models, beta, weights, vllm_kwargs, sampling_params, todo, done,
            replicas=replicas, resources=replica_resources(
                vllm_kwargs, cpus_per_replica, gpus_per_replica, groups),
            env_vars={**{k: os.environ[k] for k in FORWARDED_ENV if k in os.environ},
                      **(env_vars or {})},
            chunk_size=chunk_size, progress=progress,
        )
        _write_in_order(batches, output, done, len(rows), progress)
    finally:
        for group in groups:
            ray.util.remove_placement_group(group)
        if started:
            ray.shutdown()
    return len(todo)


def _generate(base, reward_models, beta, weights, vllm_kwargs, sampling_params, todo, first,
              *, replicas, resources, env_vars, chunk_size, progress):
    """Lists of (index, line) for rows first, first+1, ..., one per batch done."""
    import ray

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # blocks come back in input order
    context.enable_progress_bars = progress
    # One engine call per batch; small jobs are split so every replica gets work.
    batch_size = max(1, min(chunk_size, math.ceil(len(todo) / replicas)))
    items = [{"index": first + i, "row": json.dumps(row)} for i, row in enumerate(todo)]
    dataset = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / batch_size))
    dataset = dataset.map_batches(
        _Replica,
        fn_constructor_args=(str(base), reward_models, beta, weights, vllm_kwargs,
                             sampling_params),
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=replicas),
        runtime_env={"env_vars": env_vars},
        **resources,
    )
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        yield list(zip(batch["index"].tolist(), batch["line"].tolist()))


def _write_in_order(batches, output: Path, first: int, total: int, progress: bool) -> None:
    """Append the lines in index order, each once, flushing after each batch received."""
    from tqdm import tqdm

    output.parent.mkdir(parents=True, exist_ok=True)
    pending: dict[int, str] = {}
    next_index = first
    with open(output, "a", encoding="utf-8") as out, tqdm(
        total=total, initial=first, unit="row", desc="generate", disable=not progress
    ) as bar:
        for batch in batches:
            # preserve_order makes this a plain append; the buffer only guards the order.
            pending.update((index, line) for index, line in batch if index >= next_index)
            written = next_index
            while next_index in pending:
                out.write(pending.pop(next_index))
                next_index += 1
            if next_index > written:
                out.flush()
                os.fsync(out.fileno())
                bar.update(next_index - written)
    if next_index != total:
        raise RuntimeError(f"the Ray job returned rows {first}..{next_index - 1} of "
                           f"{first}..{total - 1}; re-run to generate the rest")
