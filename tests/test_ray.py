"""The batch job on Ray (`genarm-vllm generate --ray`): same output as the single-process job,
a killed worker neither loses nor duplicates rows, and the tensor-parallel plumbing.

Ray runs locally, started and stopped here with 2 CPUs; each replica (Ray actor) runs
vLLM in-process on the tiny models.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

# A one-node test cluster on the loopback address only (Ray reads this when imported).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import psutil  # noqa: E402
import pytest  # noqa: E402
import ray  # noqa: E402
from batch_rows import (  # noqa: E402, I001
    POISON,
    build_poison_models,
    check_poisoned_output,
    good_rows,
    kill_when_lines,
    read_jsonl,
    write_poisoned,
)
from vllm import SamplingParams  # noqa: E402

from genarm_vllm.cli import main, parse_engine_flags  # noqa: E402
from genarm_vllm.jobs import ray_job  # noqa: E402
from genarm_vllm.jobs.batch import run_job  # noqa: E402
from genarm_vllm.jobs.fingerprint import settings_path  # noqa: E402
from genarm_vllm.jobs.progress import JobSummary  # noqa: E402
from genarm_vllm.runtime import LOCAL_ENV  # noqa: E402
from genarm_vllm.testing import build_model, build_tokenizer  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
ENGINE_FLAGS = ["--max-model-len", "256", "--enforce-eager", "--dtype", "float32"]
# What every replica needs on this machine (see README: CPU settings).
ACTOR_ENV = LOCAL_ENV
WORDS = "the cat sat on a dog happy sun we love green trees she saw big red car".split()


def make_rows(n):
    """Prompts and chat rows, per-row beta / weights, extra fields of several types."""
    rows = []
    for i in range(n):
        text = " ".join(WORDS[(3 * i + k) % len(WORDS)] for k in range(2 + i % 4))
        row = {"id": f"r{i}"}
        row.update({"messages": [{"role": "user", "content": text}]} if i % 5 == 0
                   else {"prompt": text})
        if i % 3 == 1:
            row["beta"] = 0.5 + i / 20
        if i % 4 == 2:
            row["weights"] = [-0.5 if i % 8 == 2 else 2.0]
        if i % 7 == 0:
            row["meta"] = {"source": "tést", "tags": [i, None, 1.5]}
        rows.append(row)
    return rows


ROWS = make_rows(40)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def model_args(tiny):
    return ["--base", tiny["base"], "--reward-model", tiny["arm_small"], "--beta", "0.5"]


@pytest.fixture(scope="module")
def reference_file(engine, tmp_path_factory):
    """The single-process job's output file for ROWS (the in-process engine of the session)."""
    folder = tmp_path_factory.mktemp("reference")
    infile = write_jsonl(folder / "in.jsonl", ROWS)
    run_job(engine("arm_small", ["arm_small"], beta=0.5), infile, folder / "out.jsonl", GREEDY,
            progress=False)
    return folder / "out.jsonl"


@pytest.fixture(scope="module")
def reference(reference_file):
    return reference_file.read_text()


@pytest.fixture(scope="module")
def ray_cluster():
    # Ray may have been imported before this module set the variable (e.g. by vLLM in an
    # earlier test): keep the driver's node address on loopback as well.
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": ACTOR_ENV})
    yield
    ray.shutdown()


# --- Flags and checks: no Ray started --------------------------------------------------

def test_cli_passes_ray_and_engine_flags(tiny, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(ray_job, "run_ray_job",
                        lambda *a, **kw: calls.append((a, kw)) or JobSummary())
    infile = write_jsonl(tmp_path / "in.jsonl", ROWS[:3])
    args = ["generate", "--base", tiny["base"], "--reward-model", tiny["arm_same"],
            "--input", infile, "--output", tmp_path / "out.jsonl", "--temperature", "0"]
    tp = ["--tensor-parallel-size", "2", "--distributed-executor-backend", "ray"]
    code = main([str(a) for a in [*args, "--ray", "--replicas", "3", "--address", "auto",
                                  "--gpus-per-replica", "2", *tp, *ENGINE_FLAGS]])
    assert code == 0
    (base, arms, _, _, params), kwargs = calls[0]
    assert (base, arms, params.temperature) == (str(tiny["base"]), [str(tiny["arm_same"])], 0)
    assert {k: kwargs[k] for k in ("replicas", "address", "gpus_per_replica")} == {
        "replicas": 3, "address": "auto", "gpus_per_replica": 2}
    assert kwargs["vllm_kwargs"] == parse_engine_flags([*tp, *ENGINE_FLAGS])
    assert kwargs["vllm_kwargs"]["tensor_parallel_size"] == 2
    assert kwargs["vllm_kwargs"]["distributed_executor_backend"] == "ray"
    # The job's fingerprint holds the engine flags that decide the output.
    assert kwargs["settings"]["engine.max_model_len"] == 256
    assert kwargs["settings"]["engine.dtype"] == "float32"
    assert (kwargs["on_error"], kwargs["reorder_buffer"]) == ("continue", 4096)

    code = main([str(a) for a in [*args, "--replicas", "2"]])
    assert code == 2 and "--replicas: applies only with --ray" in capsys.readouterr().err


def test_replica_builds_guided_llm_with_the_engine_flags(monkeypatch):
    built = []

    class FakeGuidedLLM:
        def __init__(self, base, reward_models, **kwargs):
            built.append((base, reward_models, kwargs))

        def get_tokenizer(self):
            return None

    monkeypatch.setattr("genarm_vllm.engine.llm.GuidedLLM", FakeGuidedLLM)
    flags = {"tensor_parallel_size": 2, "distributed_executor_backend": "ray"}
    ray_job._Replica("B", ["A"], 0.5, [2.0], flags, GREEDY)
    assert built == [("B", ["A"], {"beta": 0.5, "weights": [2.0], **flags})]

    # With vLLM's Ray executor the replica reserves its GPUs as a placement group for
    # vLLM's workers; otherwise the replica actor holds them itself.
    resources = ray_job.replica_resources(flags, 1.0, 2)
    assert resources["num_gpus"] == 0 and callable(resources["ray_remote_args_fn"])
    assert ray_job.replica_resources({"tensor_parallel_size": 2}, 1.0, 2) == {
        "num_cpus": 1.0, "num_gpus": 2}


def test_tensor_parallel_error_fires_before_ray_starts(tiny, tmp_path, monkeypatch, capsys):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(ray, "init", no_ray)
    infile = write_jsonl(tmp_path / "in.jsonl", ROWS[:3])
    tp2 = {"tensor_parallel_size": 2, "distributed_executor_backend": "ray"}
    # arm_small has 1 attention head: it cannot be split over 2 GPUs.
    with pytest.raises(ValueError, match=r"arm_small has 1 attention heads.*tensor_parallel_size=2"):
        ray_job.run_ray_job(tiny["base"], [tiny["arm_small"]], infile, tmp_path / "o.jsonl",
                            GREEDY, vllm_kwargs=tp2)
    # The base is checked too: 2 heads over 4 GPUs (the reward model, 4 heads, would fit).
    base2 = build_model(tmp_path / "base2", build_tokenizer(tmp_path / "tok"), hidden_size=64,
                        num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match=r"base model .*base2 has 2 attention heads"):
        ray_job.run_ray_job(base2, [tiny["arm_same"]], infile, tmp_path / "o.jsonl", GREEDY,
                            vllm_kwargs={"tensor_parallel_size": 4})
    # As a user sees it.
    code = main([str(a) for a in ["generate", *model_args(tiny), "--input", infile, "--output",
                                  tmp_path / "o.jsonl", "--ray", "--tensor-parallel-size", "2",
                                  "--distributed-executor-backend", "ray"]])
    assert code == 2 and "cannot be sharded over tensor_parallel_size=2" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


# --- The job on a local Ray cluster ----------------------------------------------------

@pytest.mark.slow
def test_ray_job_equals_single_process_job(ray_cluster, reference, tiny, tmp_path, capsys):
    shards = tmp_path / "shards"  # sharded input: a folder of JSONL files, in name order
    shards.mkdir()
    for k, start in enumerate(range(0, len(ROWS), 15)):
        write_jsonl(shards / f"part-{k:03d}.jsonl", ROWS[start:start + 15])
    outfile = tmp_path / "out.jsonl"
    args = ["generate", *model_args(tiny), "--input", shards, "--output", outfile,
            "--temperature", "0", "--max-tokens", "12", "--ignore-eos", *ENGINE_FLAGS,
            "--ray", "--replicas", "2", "--cpus-per-replica", "1", "--chunk-size", "8"]
    assert main([str(a) for a in args]) == 0
    assert outfile.read_text() == reference  # same rows, same fields, same order

    # The placement group a tensor-parallel replica would run in: one GPU per bundle.
    groups = []
    strategy = ray_job.replica_resources(
        {"distributed_executor_backend": "ray"}, 1.0, 2, groups)["ray_remote_args_fn"]()
    group = strategy["scheduling_strategy"].placement_group
    assert group.bundle_specs == [{"GPU": 1, "CPU": 1.0}] * 2 and groups == [group]
    ray.util.remove_placement_group(group)

    capsys.readouterr()
    assert main([str(a) for a in args]) == 0  # a finished job is a no-op
    assert "nothing to do" in capsys.readouterr().out
    assert outfile.read_text() == reference


def replica_processes():
    """This session's engine replicas (Ray actors started under this test process)."""
    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "MapBatches(_Replica)" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:  # gone meanwhile
            pass
    return found


@pytest.mark.slow
def test_killed_worker_and_interrupted_run_lose_and_duplicate_nothing(
    ray_cluster, reference, reference_file, tiny, tmp_path
):
    infile = write_jsonl(tmp_path / "in.jsonl", ROWS)
    outfile = tmp_path / "out.jsonl"
    # The single-process job's settings: the Ray job's fingerprint of the same settings
    # (computed from the arguments, not from an engine) must equal them.
    shutil.copy(settings_path(reference_file), settings_path(outfile))
    # An earlier run stopped after 4 rows, in the middle of writing the 5th.
    reference_lines = reference.splitlines(keepends=True)
    outfile.write_text("".join(reference_lines[:4]) + reference_lines[4][:30])

    killed, finished = {}, threading.Event()

    def kill_a_replica_mid_job():
        # Once this run has written its first rows, SIGKILL one replica: the others'
        # batches are in flight or queued on it (small batches, 36 rows to go).
        while not finished.is_set():
            lines = outfile.read_text().count("\n")
            replicas = replica_processes() if lines > 4 else []
            if replicas:
                killed.update(pid=replicas[0].pid, lines_written=lines)
                os.kill(replicas[0].pid, signal.SIGKILL)
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_a_replica_mid_job, daemon=True)
    killer.start()
    try:
        added = ray_job.run_ray_job(
            tiny["base"], [tiny["arm_small"]], infile, outfile, GREEDY, beta=0.5,
            vllm_kwargs=dict(enforce_eager=True, max_model_len=256, dtype="float32"),
            replicas=2, cpus_per_replica=1, chunk_size=2, env_vars=ACTOR_ENV,
        )
    finally:
        finished.set()
        killer.join()
    assert killed, "no replica was killed"
    assert killed["lines_written"] < len(ROWS), "the kill came after the job's last row"
    assert (added.rows_before, added.rows_done) == (4, len(ROWS) - 4)
    assert outfile.read_text() == reference  # nothing lost, nothing written twice


@pytest.mark.slow
def test_poison_rows_on_ray_give_the_single_process_output(ray_cluster, tiny, engine,
                                                           tmp_path_factory, tmp_path):
    models = build_poison_models(tmp_path_factory, tiny)
    llm = engine("poison", base=models["base"], reward_paths=[models["arm"]])
    good = good_rows(500)
    good_out = tmp_path / "good_out.jsonl"
    run_job(llm, write_jsonl(tmp_path / "good.jsonl", good), good_out, GREEDY, progress=False)
    folder, expected = write_poisoned(tmp_path / "in", good)  # 9 poison rows, 2 shards
    single = tmp_path / "single.jsonl"
    run_job(llm, folder, single, GREEDY, progress=False)

    out = tmp_path / "ray.jsonl"
    summary = ray_job.run_ray_job(
        models["base"], [models["arm"]], folder, out, GREEDY,
        vllm_kwargs=dict(enforce_eager=True, max_model_len=256, dtype="float32"),
        replicas=1, chunk_size=64, env_vars=ACTOR_ENV, progress=False)
    assert (summary.rows_done, summary.rows_failed) == (500, len(POISON))
    check_poisoned_output(read_jsonl(out), read_jsonl(good_out), expected)
    assert out.read_text() == single.read_text()


def driver(args, peak_rss=False):
    """The CLI as its own driver process (it joins the test cluster)."""
    code = ("import resource, sys; from genarm_vllm.cli import main; code = main(sys.argv[1:]); "
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); "
            "sys.exit(code)")
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ray_args(tiny, infile, outfile, *extra):
    return ["generate", *model_args(tiny), "--input", infile, "--output", outfile,
            "--temperature", "0", "--max-tokens", "12", "--ignore-eos", *ENGINE_FLAGS,
            "--ray", "--address", ray.get_runtime_context().gcs_address, *extra]


@pytest.mark.slow
def test_kill_9_of_the_driver_then_rerun_gives_every_row_once(ray_cluster, reference, tiny,
                                                              tmp_path):
    infile = write_jsonl(tmp_path / "in.jsonl", ROWS)
    outfile = tmp_path / "out.jsonl"
    # Rows reach the file in bursts (a batch at a time, in input order). Few sequences per
    # replica make them trickle out, and a kill point in the first half stays clear of the
    # end: at most 2 replicas x 3 batches x 3 rows can be finished but unwritten at once.
    args = ray_args(tiny, infile, outfile, "--replicas", "2", "--chunk-size", "3",
                    "--max-num-seqs", "2")
    kill_at = random.randint(1, len(ROWS) // 2)
    lines = kill_when_lines(driver(args), outfile, kill_at, timeout=600)
    assert lines < len(ROWS), "the kill came after the last row"
    rerun = driver(args)
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr[-3000:]
    assert [json.loads(line)["id"] for line in outfile.read_text().splitlines()] == [
        r["id"] for r in ROWS]  # every row exactly once
    assert outfile.read_text() == reference, f"killed at {lines} rows"


@pytest.mark.slow
def test_driver_memory_does_not_grow_with_the_input(ray_cluster, tiny, tmp_path):
    """10x the rows (1,000 -> 10,000 rows of 10 kB: 10 -> 100 MB of input, and as much
    output) must raise the driver's peak RSS by well under 2x: here at most 1.25x. The
    driver used to hold every row twice (dicts and JSON text), about 2 x 100 MB more.
    Measured (2026-12-02, this machine kind): 2916 MiB -> 3183 MiB, 1.09x."""
    peaks = {}
    for n in (1000, 10000):
        rows = [{"id": i, "prompt": "the cat sat", "pad": "x" * 10_000} for i in range(n)]
        infile = write_jsonl(tmp_path / f"in{n}.jsonl", rows)
        outfile = tmp_path / f"out{n}.jsonl"
        args = ray_args(tiny, infile, outfile, "--replicas", "1")
        args[args.index("--max-tokens") + 1] = "1"
        process = driver(args)
        stdout, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, stderr[-3000:]
        assert outfile.read_text().count("\n") == n
        peaks[n] = int(stdout.split("PEAK_RSS_KB")[1].split()[0])
    ratio = peaks[10000] / peaks[1000]
    print(f"driver peak RSS: {peaks[1000] / 1024:.0f} MiB (1,000 rows), "
          f"{peaks[10000] / 1024:.0f} MiB (10,000 rows): {ratio:.2f}x")
    assert ratio < 1.25, peaks


# Peak RSS from VmHWM: getrusage's ru_maxrss survives exec, so a child of this (large)
# test process would report the test process's own peak.
READER = """
import re, sys
import pyarrow.fs
from genarm_vllm.jobs.ray_job import numbered_blocks
path, rows, biggest = sys.argv[1], 0, 0
with pyarrow.fs.LocalFileSystem().open_input_stream(path) as f:
    for table in numbered_blocks(f, path, 0, 0):
        rows, biggest = rows + table.num_rows, max(biggest, table.nbytes)
peak = re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)
print("ROWS", rows, "BIGGEST", biggest, "PEAK_RSS_KB", peak)
"""


def test_reader_memory_does_not_grow_with_the_shard(tmp_path):
    """The driver-memory test's method, applied to the Ray reader of one shard: 10x the rows
    (10 -> 100 MB, one file) must raise the reading process's peak RSS by at most 1.25x. The
    reader used to read each shard whole (f.readall()) and hold all its lines: measured
    (2026-12-06, VmHWM) 178 MiB -> 373 MiB, 2.1x; streamed, 178 -> 196-206 MiB, 1.04-1.15x."""
    peaks = {}
    for n in (1000, 10000):
        infile = write_jsonl(tmp_path / f"in{n}.jsonl",
                             [{"id": i, "prompt": "the cat sat", "pad": "x" * 10_000}
                              for i in range(n)])
        result = subprocess.run([sys.executable, "-c", READER, str(infile)],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        fields = result.stdout.split()
        assert int(fields[fields.index("ROWS") + 1]) == n
        assert int(fields[fields.index("BIGGEST") + 1]) < 2 * ray_job.READ_BLOCK_BYTES
        peaks[n] = int(fields[fields.index("PEAK_RSS_KB") + 1])
    ratio = peaks[10000] / peaks[1000]
    print(f"reader peak RSS: {peaks[1000] / 1024:.0f} MiB (10 MB shard), "
          f"{peaks[10000] / 1024:.0f} MiB (100 MB shard): {ratio:.2f}x")
    assert ratio < 1.25, peaks


def test_the_reader_numbers_every_line_from_the_start_position(tmp_path):
    import pyarrow.fs

    lines = ["{\"id\": 0}", "", "{\"id\": 2}\r", "x" * 300, "{\"id\": 4}"]
    path = tmp_path / "in.jsonl"
    path.write_bytes(("\n".join(lines)).encode())  # no \n after the last line
    for start in (100, 102, 104):  # the shard's lines are input positions 100..104
        with pyarrow.fs.LocalFileSystem().open_input_stream(str(path)) as f:
            tables = list(ray_job.numbered_blocks(f, "shard", 100, start))
        got = [row for t in tables for row in t.to_pylist()]
        assert got == [{"index": 100 + k, "file": "shard", "line": k + 1, "text": text.rstrip("\r")}
                       for k, text in enumerate(lines) if 100 + k >= start]


def test_a_batch_counts_rows_set_from_two_threads_at_once():
    # _Batch.set runs in a call's thread and in the engine thread. The count is made to
    # yield between its read and its write (as a thread switch there would): without a
    # lock both threads read 2 and write 1, and the batch never finishes.
    class YieldingCount(int):
        def __sub__(self, other):
            value = int(self)
            time.sleep(0.05)
            return YieldingCount(value - other)

    batch = ray_job._Batch(2)
    batch.remaining = YieldingCount(2)
    threads = [threading.Thread(target=batch.set, args=(k, ("line", "", "", 1)))
               for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert batch.remaining == 0 and batch.done.is_set()


def test_replicas_run_the_engine_settings_the_driver_recorded(tiny, tmp_path, monkeypatch):
    # A CPU head with GPU workers: the driver's defaults (float32, no chunked prefill) are
    # what the settings file records, and so what every replica's engine must get; a
    # replica used to apply its own node's defaults (bf16 "auto" on a GPU).
    from genarm_vllm.engine import defaults

    class Stop(Exception):
        pass

    captured = {}

    class FakeDataset:
        def map_batches(self, fn, **kwargs):
            captured.update(kwargs)
            raise Stop

    monkeypatch.setattr(ray, "is_initialized", lambda: True)  # no Ray is started
    monkeypatch.setattr(ray.data, "read_datasource", lambda *a, **k: FakeDataset())
    monkeypatch.setattr(ray_job, "numbered_lines_datasource", lambda *a: None)
    monkeypatch.setattr(defaults, "has_gpu", lambda: False)  # the driver
    infile = write_jsonl(tmp_path / "in.jsonl", ROWS[:3])
    out = tmp_path / "out.jsonl"
    with pytest.raises(Stop):
        ray_job.run_ray_job(tiny["base"], [tiny["arm_small"]], infile, out, GREEDY,
                            beta=0.5, vllm_kwargs={"enforce_eager": True}, gpus_per_replica=0,
                            progress=False)
    recorded = json.loads(settings_path(out).read_text())
    base, arms, beta, weights, engine_kwargs, params = captured["fn_constructor_args"]

    built = []

    class FakeLLM:
        def __init__(self, model, **kwargs):
            built.append(kwargs)

        def get_tokenizer(self):
            return None

    monkeypatch.setattr("vllm.LLM", FakeLLM)
    monkeypatch.setattr(defaults, "has_gpu", lambda: True)  # a GPU worker
    ray_job._Replica(base, arms, beta, weights, engine_kwargs, params)
    (ran,) = built
    for name in ("dtype", "max_model_len", "kv_cache_dtype", "quantization", "seed"):
        assert recorded[f"engine.{name}"] == ran.get(name, recorded[f"engine.{name}"]), name
    assert ran["dtype"] == recorded["engine.dtype"] == "float32"
    assert ran["enable_chunked_prefill"] is False and ran["enforce_eager"] is True
    assert ran["logprobs_mode"] == "processed_logprobs"


@pytest.mark.slow
def test_a_failed_engine_restarts_its_replica_and_loses_no_row(ray_cluster, reference, tiny,
                                                               tmp_path):
    # An engine failure used to leave the replica up with a dead engine: every later call
    # failed, Ray never restarted it, the job failed. Now the replica's process ends, Ray
    # restarts it and re-runs its batches.
    infile = write_jsonl(tmp_path / "in.jsonl", ROWS)
    outfile = tmp_path / "out.jsonl"
    marker = tmp_path / "engine-failed"
    summary = ray_job.run_ray_job(
        tiny["base"], [tiny["arm_small"]], infile, outfile, GREEDY, beta=0.5,
        vllm_kwargs=dict(enforce_eager=True, max_model_len=256, dtype="float32"),
        replicas=1, cpus_per_replica=1, chunk_size=4,
        env_vars={**ACTOR_ENV, ray_job.FAIL_ONCE_ENV: str(marker)}, progress=False)
    assert marker.exists(), "no engine failed"
    assert summary.rows_done == len(ROWS)
    assert outfile.read_text() == reference  # every row exactly once, in order


# --- `genarm-vllm sweep --ray` ---------------------------------------------------------

@pytest.mark.slow
def test_sweep_on_ray_equals_the_single_process_sweep(ray_cluster, engine, tiny, tmp_path,
                                                      capsys):
    from genarm_vllm.jobs import sweep

    # Rows without guidance of their own (the grid decides it), one of them without a prompt.
    rows = [{k: v for k, v in r.items() if k not in ("beta", "weights")} for r in ROWS[:9]]
    rows.insert(4, {"id": "no-prompt", "text": "x"})
    settings_file = tmp_path / "settings.json"
    settings_file.write_text(json.dumps([{"name": "engine default"},
                                         {"name": "sharp", "weights": [2.0]}]))
    grid = ["--settings", settings_file, "--betas", "1,0.25", "--weights", "1;0;-0.5"]
    settings = sweep.read_settings_file(settings_file) + sweep.grid([1, 0.25], [[1], [0], [-0.5]])

    # The in-process sweep on an engine whose default beta the CLI gives as --default-beta.
    single = tmp_path / "single" / "out.jsonl"
    single.parent.mkdir()
    sweep.run_sweep(engine("arm_small", ["arm_small"], beta=0.5),
                    write_jsonl(tmp_path / "in.jsonl", rows), single, GREEDY, settings,
                    progress=False)
    want = single.read_text().replace(str(single.parent), "DIR")  # error rows name the file
    assert want.count("\n") == len(rows) * len(settings)
    assert want.count('"error"') == len(settings)

    out = tmp_path / "ray" / "out.jsonl"
    args = ["sweep", "--base", tiny["base"], "--reward-model", tiny["arm_small"],
            "--default-beta", "0.5", *grid, "--input", tmp_path / "in.jsonl", "--output", out,
            "--temperature", "0", "--max-tokens", "12", "--ignore-eos", *ENGINE_FLAGS,
            "--ray", "--replicas", "2", "--chunk-size", "8"]
    assert main([str(a) for a in args]) == 0
    assert out.read_text().replace(str(out.parent), "DIR") == want
    assert not sweep.expanded_path_for(out).exists()
    assert json.loads(settings_path(out).read_text())["sweep.settings"] == [
        s.fields() for s in settings]

    # Resume on Ray from an output the in-process sweep began (cut in the middle of a row):
    # both paths fingerprint the same settings, and the rest comes out the same.
    lines = want.splitlines(keepends=True)
    out.write_text("".join(lines[:11]).replace("DIR", str(out.parent)) + lines[11][:20])
    shutil.copy(settings_path(single), settings_path(out))
    capsys.readouterr()
    assert main([str(a) for a in args]) == 0
    assert "11 already there" in capsys.readouterr().out
    assert out.read_text().replace(str(out.parent), "DIR") == want
