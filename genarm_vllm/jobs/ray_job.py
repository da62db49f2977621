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
worker neither loses nor duplicates rows; the driver also writes each position once. A
replica whose engine fails ends its own process (os._exit), so that Ray restarts it with a
fresh engine and re-runs its batches the same way (an actor that stayed up with a broken
engine would fail every later call, and Ray never restarts a live actor).

Tensor parallelism: each replica is one vLLM engine of tensor_parallel_size GPUs; with
distributed_executor_backend="ray" the replica reserves them as a placement group (one
GPU per bundle), which vLLM's Ray executor picks up for its workers (they may then span
nodes). The reward models are sub-models of the one vLLM model and are sharded with it.
"""

from __future__ import annotations

import math
import os
import queue
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from genarm_vllm.jobs.batch import (
    REORDER_BUFFER,
    InputLine,
    JobStart,
    PromptBuilder,
    RowError,
    check_on_error,
    error_line,
    file_lines,
    input_files,
    located,
    output_line,
    parse_line,
    prepare_job,
)
from genarm_vllm.runtime import LOCAL_ENV

# Environment variables the driver passes on to the replicas: the runtime settings of
# runtime.LOCAL_ENV and vLLM switches that change results or memory. Node-specific ones
# (VLLM_HOST_IP, CUDA_VISIBLE_DEVICES, ...) are left to each node.
FORWARDED_ENV = (*LOCAL_ENV, "VLLM_CPU_OMP_THREADS_BIND", "VLLM_USE_V2_MODEL_RUNNER")

# Batches one replica works on at once: while one batch's last rows finish, the next
# batch's rows already fill the engine.
CALLS_PER_REPLICA = 3
# The reader's blocks: at most this many rows, or this many bytes of text, whichever comes
# first. The reader streams each shard (READ_CHUNK_BYTES at a time), so a read task holds
# about one block, whatever the shard's size.
READ_BLOCK_ROWS = 4096
READ_BLOCK_BYTES = 8 << 20
READ_CHUNK_BYTES = 1 << 20
BLANK = "blank"  # kind of a blank line: no output row


def binary_lines(f, chunk_bytes: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
    """The lines of a binary stream with a read(n) method (a pyarrow input stream), each
    with its \\n (the last one may lack it), read chunk_bytes at a time."""
    pieces: list[bytes] = []  # the start of a line that spans chunks
    while True:
        data = f.read(chunk_bytes)
        if not data:
            break
        data = bytes(data)
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                pieces.append(data[start:])
                break
            line = data[start:end + 1]
            if pieces:
                line = b"".join([*pieces, line])
                pieces.clear()
            yield line
            start = end + 1
    if pieces and any(pieces):
        yield b"".join(pieces)


def numbered_blocks(f, name: str, first_index: int, start: int):
    """The reader of one shard: pyarrow tables of its lines (index, file, line, text) from
    input position `start` on, streamed from `f` (a binary stream): at most READ_BLOCK_ROWS
    rows or READ_BLOCK_BYTES of text per table, so memory does not grow with the shard."""
    import pyarrow as pa

    columns: dict[str, list] = {"index": [], "file": [], "line": [], "text": []}
    size = 0

    def block():
        table = pa.table({
            "index": pa.array(columns["index"], pa.int64()),
            "file": pa.array(columns["file"], pa.string()),
            "line": pa.array(columns["line"], pa.int64()),
            "text": pa.array(columns["text"], pa.large_string()),
        })
        for values in columns.values():
            values.clear()
        return table

    index = first_index
    for number, text in enumerate(file_lines(binary_lines(f)), start=1):
        if index >= start:
            for key, value in zip(columns, (index, name, number, text)):
                columns[key].append(value)
            size += len(text)
            if len(columns["index"]) >= READ_BLOCK_ROWS or size >= READ_BLOCK_BYTES:
                yield block()
                size = 0
        index += 1
    if columns["index"]:
        yield block()


def numbered_lines_datasource(files: list[str], first_index: dict[str, int], start: int):
    """Ray Data's file reader over `files`, one row per line: index, file, line, text."""
    from ray.data.datasource.file_based_datasource import FileBasedDatasource

    class NumberedLines(FileBasedDatasource):
        def _read_stream(self, f, path: str):
            name = path if path in first_index else os.path.abspath(path)
            yield from numbered_blocks(f, name, first_index[name], start)

    return NumberedLines(files)


# Tests only: a file path; the first replica engine step that finds no file there creates
# it and raises, as a failing engine would (once per path, across replicas and restarts).
FAIL_ONCE_ENV = "GENARM_TEST_ENGINE_FAILS_ONCE"


def _failure_for_tests() -> None:
    path = os.environ.get(FAIL_ONCE_ENV)
    if not path:
        return
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    raise RuntimeError(f"engine failure injected by {FAIL_ONCE_ENV} (tests)")


class _Batch:
    """One map_batches call waiting for its rows: (line, kind, error, tokens) per row."""

    def __init__(self, size: int):
        self.results: list = [None] * size
        self.remaining = size
        self.done = threading.Event()
        # set() runs in the calling thread (rows refused before the engine) and in the
        # engine thread (finished rows): the count is read and written under this lock.
        self._lock = threading.Lock()

    def set(self, position: int, result: tuple) -> None:
        with self._lock:
            self.results[position] = result
            self.remaining -= 1
            finished = self.remaining == 0
        if finished:
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
                    _failure_for_tests()
                    for (batch, position, row), result in self.feeder.step():
                        line, tokens = output_line(row, result)
                        batch.set(position, (line, "", "", tokens))
        except BaseException:  # the engine died: end this actor, so that Ray restarts it
            # Ray restarts an actor that dies (max_restarts), not one that stays up with a
            # broken engine, and re-runs the calls it held (max_task_retries) on the new
            # one; the driver writes each input position once, so no row is lost or
            # written twice. os._exit, not ray.actor.exit_actor(): an intended exit is
            # not restarted, and this is not the actor's main thread.
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        self._start()
        size = len(batch["index"])
        waiting = _Batch(size)
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
        if size:
            waiting.done.wait()
        lines, kinds, errors, tokens = zip(*waiting.results) if size else ((), (), (), ())
        return {"index": batch["index"], "line": np.array(lines, dtype=object),
                "kind": np.array(kinds, dtype=object), "error": np.array(errors, dtype=object),
                "tokens": np.array(tokens, dtype=np.int64)}


# Engine settings that depend on the node an engine runs on (its free memory): left to
# each replica's own engine_defaults unless the user set them.
NODE_LOCAL_SETTINGS = ("kv_cache_memory_bytes",)


def replica_engine_kwargs(base, reward_models, vllm_kwargs: dict) -> dict:
    """The engine kwargs every replica runs with, decided once, on the driver: the user's
    plus GenARM's defaults (engine.defaults.engine_defaults: dtype, chunked prefill,
    logprobs_mode, max_model_len), so that the settings file, made from the same
    defaults, says what the replicas ran even where their nodes differ from the driver's
    (a CPU head with GPU workers). Only NODE_LOCAL_SETTINGS are left to the replicas."""
    from genarm_vllm.engine.defaults import engine_defaults

    defaults = engine_defaults(str(base), list(reward_models), vllm_kwargs)
    return {**vllm_kwargs, **{k: v for k, v in defaults.items() if k not in NODE_LOCAL_SETTINGS}}


def check_models(base, reward_models, vllm_kwargs: dict,
                 own_chat_templates: bool | None = None) -> list[str]:
    """The load-time checks GuidedLLM runs, here in the driver, before Ray starts.

    Returns the reward model folders (the given ones, or a bundle's).
    """
    from genarm_vllm.engine.validation import check_reward_models, check_tensor_parallel
    from genarm_vllm.guidance import OWN_CHAT_TEMPLATES_FIELD, read_bundle

    reward_models = [str(p) for p in reward_models or []]
    bundle = read_bundle(base)
    if not reward_models and bundle is not None:
        reward_models = list(bundle["genarm_reward_models"])
    if own_chat_templates is None:
        own_chat_templates = bool((bundle or {}).get(OWN_CHAT_TEMPLATES_FIELD))
    tp = vllm_kwargs.get("tensor_parallel_size", 1)
    check_reward_models(str(base), reward_models,
                        max_model_len=vllm_kwargs.get("max_model_len"), tensor_parallel_size=tp,
                        speculative_config=vllm_kwargs.get("speculative_config"),
                        pipeline_parallel_size=vllm_kwargs.get("pipeline_parallel_size", 1),
                        own_chat_templates=own_chat_templates)
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
    own_chat_templates: bool | None = None,
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
    prepared: JobStart | None = None,
):
    """Generate for every input row not yet in `output_path` on Ray; returns a JobSummary.

    Connects to the cluster at `address` (None: the one named by RAY_ADDRESS, else a new
    local one) unless Ray is already initialized; shuts down only a Ray it started.
    gpus_per_replica None: tensor_parallel_size if the cluster has GPUs, else 0.
    env_vars: extra environment for the replicas (added to the FORWARDED_ENV ones).
    own_chat_templates: GuidedLLM's option (None: the bundle's setting, else off).
    settings: the job's fingerprint (None: fingerprint.job_settings of these arguments).
    prepared: batch.prepare_job's result when the caller has it (the CLI): the input is then
        not read again before Ray starts.
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
    check_on_error(on_error)
    vllm_kwargs = dict(vllm_kwargs or {})
    reward_models = check_models(base, reward_models, vllm_kwargs, own_chat_templates)
    output, files = Path(output_path), input_files(input_path)
    if settings is None:
        settings = job_settings(base, reward_models, beta, weights, sampling_params, vllm_kwargs,
                                own_chat_templates)
    engine_kwargs = replica_engine_kwargs(base, reward_models, vllm_kwargs)
    if own_chat_templates is not None:  # GuidedLLM's own keyword, among the engine's
        engine_kwargs["own_chat_templates"] = own_chat_templates
    if prepared is None:
        prepared = prepare_job(output, settings, files, len(reward_models), overwrite=overwrite)
    start, done, counts = prepared.start, prepared.done, prepared.line_counts
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
    bar = JobProgress(prepared.total, done, progress)
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
            fn_constructor_args=(str(base), reward_models, beta, weights, engine_kwargs,
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
