"""The JSONL batch job on a Ray cluster: `genarm-vllm generate --ray`.

Same input, output, error-row and resume semantics as the single-process job
(batch_job.py), spread over an actor pool of GuidedLLM engines with Ray Data:

- the driver checks the models (tokenizers, lengths, heads vs tensor_parallel_size) and
  the stored settings before any Ray work starts, finds where the output stops (streaming
  the input and the output side by side) and counts each shard's lines; it never holds
  the rows;
- Ray Data reads the shards itself (NumberedLines: Ray's text-file reader, each line
  tagged with its input position, file and line number), from the first line not yet
  in the output;
- `map_batches` runs the lines over `replicas` actors, each holding one GuidedLLM. A
  replica takes several batches at once (threaded calls) and feeds all of them into one
  engine loop (feeding.EngineFeeder), so its engine stays full across batch boundaries
  instead of draining at the end of each batch; rows are parsed, checked and turned into
  output or error lines by the same functions as the single-process job;
- the driver writes the lines to the one output file in input order (Ray Data delivers
  batches in order, `preserve_order`) through the same bounded writer as the
  single-process job, flushing as it goes, so an interrupted run (a kill -9 of the driver
  included) resumes exactly.

Output: one ordered JSONL file, identical to the single-process job's (not one part file
per shard: an ordered single file is what the single-process job writes, and its resume
needs no bookkeeping beyond the file itself).

Fault tolerance is Ray's own: Ray Data's actor pools restart a dead actor
(max_restarts=-1) and re-run the batches it held (max_task_retries=-1), so a killed
worker neither loses nor duplicates rows; the driver also writes each position once.

Tensor parallelism: each replica is one vLLM engine of tensor_parallel_size GPUs; with
distributed_executor_backend="ray" the replica reserves them as a placement group (one
GPU per bundle), which vLLM's Ray executor picks up for its workers (they may then span
nodes). The reward models are sub-models of the one vLLM model and are sharded with it.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from pathlib import Path

from genarm_vllm.jobs.batch import (
    REORDER_BUFFER,
    InputLine,
    PromptBuilder,
    RowError,
    count_rows,
    error_line,
    input_files,
    line_counts,
    lines_of_block,
    located,
    output_line,
    parse_line,
    prepare_output,
)
from genarm_vllm.runtime import LOCAL_ENV

# Environment variables the driver passes on to the replicas: the runtime settings of
# runtime.LOCAL_ENV and vLLM switches that change results or memory. Node-specific ones
# (VLLM_HOST_IP, CUDA_VISIBLE_DEVICES, ...) are left to each node.
FORWARDED_ENV = (*LOCAL_ENV, "VLLM_CPU_OMP_THREADS_BIND", "VLLM_USE_V2_MODEL_RUNNER")

# Batches one replica works on at once: while one batch's last rows finish, the next
# batch's rows already fill the engine.
CALLS_PER_REPLICA = 3
# Rows per block the reader emits (a shard is read whole, as Ray's read_text does).
READ_BLOCK_ROWS = 4096
BLANK = "blank"  # kind of a blank line: no output row


def numbered_lines_datasource(files: list[str], first_index: dict[str, int], start: int):
    """Ray Data's file reader over `files`, one row per line: index, file, line, text."""
    from ray.data.datasource.file_based_datasource import FileBasedDatasource

    class NumberedLines(FileBasedDatasource):
        def _read_stream(self, f, path: str):
            import pyarrow as pa

            name = path if path in first_index else os.path.abspath(path)
            rows = [item for item in lines_of_block(f.readall(), name, first_index[name])
                    if item.index >= start]
            for at in range(0, len(rows), READ_BLOCK_ROWS):
                part = rows[at:at + READ_BLOCK_ROWS]
                yield pa.table({
                    "index": pa.array([r.index for r in part], pa.int64()),
                    "file": pa.array([r.file for r in part], pa.string()),
                    "line": pa.array([r.line for r in part], pa.int64()),
                    "text": pa.array([r.text for r in part], pa.large_string()),
                })

    return NumberedLines(files)


class _Batch:
    """One map_batches call waiting for its rows: (line, kind, error, tokens) per row."""

    def __init__(self, size: int):
        self.results: list = [None] * size
        self.remaining = size
        self.done = threading.Event()

    def set(self, position: int, result: tuple) -> None:
        self.results[position] = result
        self.remaining -= 1
        if self.remaining == 0:
            self.done.set()


class _Replica:
    """One GuidedLLM engine in a Ray actor, fed by every batch it holds at once."""

    def __init__(self, base, reward_models, beta, weights, vllm_kwargs, sampling_params):
        from genarm_vllm.engine.llm import GuidedLLM

        self.llm = GuidedLLM(base, reward_models, beta=beta, weights=weights, **vllm_kwargs)
        self.sampling_params = sampling_params
        self._started = threading.Lock()
        self.feeder = None

    def _start(self) -> None:
        """At the first call: the row checks, the feeder and the one engine thread."""
        from genarm_vllm.jobs.feeding import EngineFeeder

        with self._started:
            if self.feeder is not None:
                return
            self.num_reward_models = len(self.llm.reward_models)
            self.builder = PromptBuilder(self.llm)
            self.submissions: queue.Queue = queue.Queue()
            self.failure: BaseException | None = None
            self.batches: set[_Batch] = set()
            # Every batch's rows go in: no cap beyond the batches Ray hands this actor.
            self.feeder = EngineFeeder(self.llm, self.sampling_params, max_in_flight=2**62)
            threading.Thread(target=self._engine_loop, daemon=True, name="genarm-engine").start()

    def _engine_loop(self) -> None:
        """The one thread that touches the engine: adds submitted rows, steps, hands back."""
        from genarm_vllm.jobs.feeding import refusal_types

        try:
            while True:
                pending = [self.submissions.get()] if not self.feeder.in_flight else []
                while True:
                    try:
                        pending.append(self.submissions.get_nowait())
                    except queue.Empty:
                        break
                for batch, position, item, fields, row, prompt, guidance in pending:
                    try:
                        self.feeder.add((batch, position, row), prompt, guidance)
                    except refusal_types() as e:
                        error = RowError("refused by the engine", str(e))
                        message = located(item, error)
                        batch.set(position, (error_line(fields, message), error.kind, message, 0))
                if self.feeder.in_flight:
                    for (batch, position, row), result in self.feeder.step():
                        completion = result.outputs[0]
                        batch.set(position, (output_line(row, completion), "", "",
                                             len(completion.token_ids)))
        except BaseException as e:  # the engine died: fail every waiting call
            self.failure = e
            for batch in list(self.batches):
                batch.done.set()

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        self._start()
        size = len(batch["index"])
        waiting = _Batch(size)
        self.batches.add(waiting)
        try:
            for position in range(size):
                item = InputLine(int(batch["index"][position]), str(batch["file"][position]),
                                 int(batch["line"][position]), str(batch["text"][position]))
                parsed = parse_line(item, self.num_reward_models)
                if parsed is None:
                    waiting.set(position, ("", BLANK, "", 0))
                    continue
                error = parsed.error
                if error is None:
                    try:
                        prompt, guidance = self.builder.request(parsed.row)
                    except RowError as e:
                        error = e
                if error is not None:
                    message = located(item, error)
                    waiting.set(position, (error_line(parsed.fields, message), error.kind,
                                           message, 0))
                    continue
                self.submissions.put((waiting, position, item, parsed.fields, parsed.row,
                                      prompt, guidance))
            while size and not waiting.done.wait(1.0) and self.failure is None:
                pass
            if self.failure is not None:
                raise RuntimeError("the engine of this replica failed") from self.failure
        finally:
            self.batches.discard(waiting)
        lines, kinds, errors, tokens = zip(*waiting.results) if size else ((), (), (), ())
        return {"index": batch["index"], "line": np.array(lines, dtype=object),
                "kind": np.array(kinds, dtype=object), "error": np.array(errors, dtype=object),
                "tokens": np.array(tokens, dtype=np.int64)}


def check_models(base, reward_models, vllm_kwargs: dict) -> list[str]:
    """The load-time checks GuidedLLM runs, here in the driver, before Ray starts.

    Returns the reward model folders (the given ones, or a bundle's).
    """
    from genarm_vllm.engine.validation import check_reward_models, check_tensor_parallel
    from genarm_vllm.guidance import read_bundle

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
    settings: dict | None = None,
    on_error: str = "continue",
    overwrite: bool = False,
    reorder_buffer: int = REORDER_BUFFER,
    replicas: int = 1,
    cpus_per_replica: float = 1.0,
    gpus_per_replica: int | None = None,
    address: str | None = None,
    env_vars: dict | None = None,
    chunk_size: int = 512,
    progress: bool = True,
):
    """Generate for every input row not yet in `output_path` on Ray; returns a JobSummary.

    Connects to the cluster at `address` (None: the one named by RAY_ADDRESS, else a new
    local one) unless Ray is already initialized; shuts down only a Ray it started.
    gpus_per_replica None: tensor_parallel_size if the cluster has GPUs, else 0.
    env_vars: extra environment for the replicas (added to the FORWARDED_ENV ones).
    settings: the job's fingerprint (None: fingerprint.job_settings of these arguments).
    """
    from genarm_vllm.jobs.fingerprint import job_settings
    from genarm_vllm.jobs.progress import JobProgress, JobSummary
    from genarm_vllm.jobs.reorder import OrderedWriter

    try:
        import ray
    except ImportError:
        raise ValueError("the Ray job needs Ray: pip install 'genarm-vllm[ray]'") from None
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    if on_error not in ("continue", "fail"):
        raise ValueError(f"on_error must be continue or fail, got {on_error!r}")
    vllm_kwargs = dict(vllm_kwargs or {})
    reward_models = check_models(base, reward_models, vllm_kwargs)
    output, files = Path(output_path), input_files(input_path)
    if settings is None:
        settings = job_settings(base, reward_models, beta, weights, sampling_params, vllm_kwargs)
    start, done = prepare_output(output, settings, files, len(reward_models), overwrite)
    counts = line_counts(files)
    total_lines = sum(counts)
    first_index, offset = {}, 0
    for file, count in zip(files, counts):
        first_index[os.path.abspath(file)] = offset
        offset += count
    todo_files = [name for name, count in zip(first_index, counts)
                  if first_index[name] + count > start]
    if start >= total_lines:
        return JobSummary(rows_before=done)

    started = not ray.is_initialized()
    if started:
        ray.init(address=address)
    groups = []  # placement groups of tensor-parallel replicas: their GPUs are freed at the end
    bar = JobProgress(count_rows(files), done, progress)
    stop = None
    try:
        if gpus_per_replica is None:
            has_gpus = ray.cluster_resources().get("GPU", 0) > 0
            gpus_per_replica = vllm_kwargs.get("tensor_parallel_size", 1) if has_gpus else 0
        # Small jobs are split so every replica's calls get work.
        batch_size = max(1, min(chunk_size,
                                math.ceil((total_lines - start) / (replicas * CALLS_PER_REPLICA))))
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # batches come back in input order
        context.enable_progress_bars = progress
        # Reading takes no CPU reservation: the replicas may hold every CPU of the
        # cluster, and a read task waiting for one would stall the job.
        dataset = ray.data.read_datasource(
            numbered_lines_datasource(todo_files, first_index, start), num_cpus=0)
        dataset = dataset.map_batches(
            _Replica,
            fn_constructor_args=(str(base), reward_models, beta, weights, vllm_kwargs,
                                 sampling_params),
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(
                size=replicas, max_concurrent_calls_per_actor=CALLS_PER_REPLICA,
                max_tasks_in_flight_per_actor=CALLS_PER_REPLICA,
                enable_true_multi_threading=True),
            runtime_env={"env_vars": {**{k: os.environ[k] for k in FORWARDED_ENV
                                         if k in os.environ}, **(env_vars or {})}},
            **replica_resources(vllm_kwargs, cpus_per_replica, gpus_per_replica, groups),
        )
        # Batches arrive in order: the buffer holds at most about one batch.
        with OrderedWriter(output, start, max(reorder_buffer, batch_size)) as writer:
            for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
                for index, line, kind, error, tokens in zip(
                        batch["index"].tolist(), batch["line"], batch["kind"], batch["error"],
                        batch["tokens"].tolist()):
                    if kind == BLANK:
                        writer.put(index, None)
                    elif kind and on_error == "fail":
                        stop = error
                        break
                    else:
                        writer.put(index, line)
                        if kind:
                            bar.failed(kind, error)
                        else:
                            bar.done(tokens=tokens)
                if stop is not None:
                    break
            reached = writer.next_index
    finally:
        summary = bar.close()
        for group in groups:
            ray.util.remove_placement_group(group)
        if started:
            ray.shutdown()
    if stop is not None:
        raise ValueError(f"stopped at a bad row (--on-error fail; {summary.rows_written} rows "
                         f"written before it): {stop}")
    if reached != total_lines:
        raise RuntimeError(f"the Ray job stopped at input line {reached} of {total_lines}; "
                           "re-run to generate the rest")
    return summary
