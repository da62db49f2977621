"""`genarm-vllm serve`: a real vLLM OpenAI-compatible server process on 127.0.0.1."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import psutil
import pytest
import requests
from vllm import SamplingParams

ARMS = ["arm_small", "arm_qwen2"]
PROMPTS = ["the cat sat on", "a dog", "we love green trees", "she saw the big red car"]
GUIDANCE = [
    {"genarm_beta": 0.5, "genarm_weights": [1.0, -0.5]},
    {"genarm_beta": 2.0, "genarm_weights": [0.0, 1.0]},
    {"genarm_weights": [0.0, 0.0]},
    {"genarm_beta": 0.3},
]
MAX_TOKENS = 10


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tiny, folder, arms, command=None):
    """A GenARM server started as a user would: (process, url, log) once healthy.

    command: the server command before its flags (default `genarm-vllm serve` on the tiny
    base and `arms`).
    """
    port = free_port()
    log = open(folder / "server.log", "w+")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # the server's normal mode
    command = command or [
        sys.executable, "-m", "genarm_vllm.cli", "serve", "--base", str(tiny["base"]),
        *[a for arm in arms for a in ("--reward-model", str(tiny[arm]))]]
    cmd = [*command, "--host", "127.0.0.1", "--port", str(port), "--max-model-len", "256",
           "--enforce-eager", "--served-model-name", "genarm-tiny"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while True:
        try:
            if requests.get(url + "/health", timeout=2).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            log.seek(0)
            stop_tree(proc)
            pytest.fail("server did not start:\n" + log.read()[-5000:])
        time.sleep(1)
    return proc, url, log


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """The module's server (two reward models); stopped at the end."""
    proc, url, log = start_server(tiny, tmp_path_factory.mktemp("serve"), ARMS)
    yield proc, url, log
    stop_tree(proc)


def stop_tree(proc):
    """SIGTERM the server; kill whatever of its process tree is left (no orphans)."""
    if proc.poll() is not None:
        return
    children = psutil.Process(proc.pid).children(recursive=True)
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    for child in psutil.wait_procs(children, timeout=10)[1]:
        child.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="none", max_retries=0)


def complete(client, prompt, xargs=None, **kwargs):
    extra = {"return_token_ids": True}
    if xargs is not None:
        extra["vllm_xargs"] = xargs
    return client.completions.create(model="genarm-tiny", prompt=prompt, max_tokens=MAX_TOKENS,
                                     temperature=0, extra_body=extra, **kwargs)


def offline(engine, prompts, guidance):
    """The same requests through GuidedLLM in this process (same reward models).

    Keys a request leaves out take the server's defaults (beta 1, weights [1, 1]).
    """
    llm = engine("small+qwen2", ARMS, beta=0.7, weights=[1.0, -0.5])
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    per_prompt = [{"beta": g.get("genarm_beta", 1.0), "weights": g.get("genarm_weights", [1.0, 1.0])}
                  for g in guidance]
    return [list(o.outputs[0].token_ids)
            for o in llm.generate(prompts, params, guidance=per_prompt, use_tqdm=False)]


@pytest.mark.slow
def test_completions_match_offline_engine(client, engine):
    got = [complete(client, p, g).choices[0].token_ids for p, g in zip(PROMPTS, GUIDANCE)]
    assert got == offline(engine, PROMPTS, GUIDANCE)
    # No vllm_xargs: the server's defaults (beta 1, weights [1, 1]).
    assert complete(client, PROMPTS[0]).choices[0].token_ids == offline(engine, PROMPTS[:1], [{}])[0]


@pytest.mark.slow
def test_chat_and_streaming(client):
    messages = [{"role": "user", "content": "the cat sat on"}]
    chat = client.chat.completions.create(
        model="genarm-tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"vllm_xargs": GUIDANCE[0]})
    text = chat.choices[0].message.content
    assert text and chat.usage.completion_tokens == MAX_TOKENS
    stream = client.chat.completions.create(
        model="genarm-tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
        stream=True, extra_body={"vllm_xargs": GUIDANCE[0]})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    unguided = client.chat.completions.create(
        model="genarm-tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"vllm_xargs": GUIDANCE[2]})
    assert unguided.choices[0].message.content != text  # guidance changes the answer

    plain = complete(client, PROMPTS[1], GUIDANCE[1]).choices[0].text
    stream = complete(client, PROMPTS[1], GUIDANCE[1], stream=True)
    assert "".join(c.choices[0].text for c in stream) == plain


@pytest.mark.slow
def test_requests_in_flight_at_once_keep_their_own_guidance(client, engine):
    want = offline(engine, [PROMPTS[0]] * 2, GUIDANCE[:2])
    assert want[0] != want[1]
    barrier, results = threading.Barrier(2), [None, None]

    def run(i):
        barrier.wait()
        results[i] = complete(client, PROMPTS[0], GUIDANCE[i]).choices[0].token_ids

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == want


@pytest.mark.slow
@pytest.mark.parametrize("xargs, key", [
    ({"genarm_beta": 0}, "genarm_beta"),
    ({"genarm_beta": -1.0}, "genarm_beta"),
    ({"genarm_beta": math.nan}, "genarm_beta"),
    ({"genarm_beta": "0.5"}, "genarm_beta"),
    ({"genarm_weights": [1.0]}, "genarm_weights"),
    ({"genarm_weights": [1.0, 2.0, 3.0]}, "genarm_weights"),
    ({"genarm_weights": "1,2"}, "genarm_weights"),
    ({"genarm_weights": [1.0, math.inf]}, "genarm_weights"),
    ({"genarm_beta": 1e-300}, "genarm_beta"),  # > 0, but 1 / beta overflows float32
    ({"genarm_weights": [1e39, 0.0]}, "genarm_weights"),  # inf in float32
])
def test_bad_guidance_is_http_400_and_server_keeps_serving(server, client, xargs, key):
    # Raw HTTP: the openai client refuses to send NaN / Infinity, other clients do not.
    body = json.dumps({"model": "genarm-tiny", "prompt": PROMPTS[0], "max_tokens": 4,
                       "vllm_xargs": xargs})
    response = requests.post(server[1] + "/v1/completions", data=body, timeout=60,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert key in response.json()["error"]["message"]
    assert len(complete(client, PROMPTS[0], GUIDANCE[0]).choices[0].token_ids) == MAX_TOKENS


@pytest.mark.slow
def test_bounded_load_with_a_client_that_disconnects(server, client, engine):
    url = server[1]
    jobs = [(PROMPTS[i % 4], GUIDANCE[(i // 4) % 4]) for i in range(64)]
    want = {(p, str(g)): t for p, g, t in zip(
        [p for p, _ in jobs[:16]], [g for _, g in jobs[:16]],
        offline(engine, [p for p, _ in jobs[:16]], [g for _, g in jobs[:16]]))}

    def disconnecting_client():
        # Streams a long completion and hangs up after a few chunks.
        with requests.post(url + "/v1/completions", stream=True, timeout=60, json={
                "model": "genarm-tiny", "prompt": PROMPTS[0], "max_tokens": 200,
                "ignore_eos": True, "stream": True, "vllm_xargs": GUIDANCE[0]}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i == 3:
                    break

    with ThreadPoolExecutor(8) as pool:
        hangups = [pool.submit(disconnecting_client) for _ in range(2)]
        futures = [pool.submit(complete, client, p, g) for p, g in jobs]
        results = [f.result() for f in futures]
        for h in hangups:
            h.result()
    assert len(results) == 64
    for (prompt, guidance), result in zip(jobs, results):
        assert result.choices[0].token_ids == want[(prompt, str(guidance))]
    assert requests.get(url + "/health", timeout=5).status_code == 200


def test_serve_applies_engine_defaults_unless_the_user_sets_them(tiny):
    from genarm_vllm.serve import server_argv

    base, arm = str(tiny["base"]), str(tiny["arm_small"])
    argv, _ = server_argv(base, [arm], 1.0, None, ["--dtype", "bfloat16"])
    # GuidedLLM's defaults; vLLM's boolean flags take the --no- form.
    from genarm_vllm.engine.defaults import engine_defaults

    if engine_defaults().get("enable_chunked_prefill") is False:  # CPU
        assert "--no-enable-chunked-prefill" in argv
    assert argv[argv.index("--logprobs-mode") + 1] == "processed_logprobs"
    assert argv.count("--dtype") == 1 and argv[argv.index("--dtype") + 1] == "bfloat16"
    argv, _ = server_argv(base, [arm], 1.0, None, ["--enable-chunked-prefill"])
    assert "--no-enable-chunked-prefill" not in argv and "--enable-chunked-prefill" in argv


@pytest.mark.parametrize("spelling", [["--max_model_len", "100000"], ["--max-model-len=100000"],
                                      "config"])
def test_serve_reads_vllm_flags_as_vllm_does(tiny, tmp_path, spelling):
    """Underscores, --x=v and --config files reach the checks, as vLLM's own parser reads them."""
    from genarm_vllm.serve import server_argv

    if spelling == "config":
        config = tmp_path / "serve.yaml"
        config.write_text("max_model_len: 100000\n")
        spelling = ["--config", str(config)]
    with pytest.raises(ValueError, match="exceeds reward model"):
        server_argv(str(tiny["base"]), [str(tiny["arm_small"])], 1.0, None, spelling)


def test_serve_merges_the_users_hf_overrides_and_processors(tiny):
    from genarm_vllm.serve import read_server_flags, server_argv

    argv, _ = server_argv(str(tiny["base"]), [str(tiny["arm_small"])], 0.5, None, [
        "--hf_overrides", '{"rope_theta": 20000.0}', "--logits-processors", "my.mod:Proc"])
    flags, _ = read_server_flags(argv[3:])  # what vLLM's server will read
    assert flags["hf_overrides"]["rope_theta"] == 20000.0
    assert flags["hf_overrides"]["genarm_beta"] == 0.5
    # The user's own; the plugin puts GenARM's first when the engine config is made.
    assert flags["logits_processors"] == ["my.mod:Proc"]
    assert flags["model"] == str(tiny["base"])


@pytest.mark.slow
def test_sigterm_stops_cleanly_without_children(tiny, tmp_path):
    """Its own server (the module's one serves the other tests, in any order)."""
    proc = start_server(tiny, tmp_path, ["arm_small"])[0]
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "vLLM's server runs its engine in a child process"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) is not None
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [p.pid for p in alive]
    finally:
        stop_tree(proc)


@pytest.mark.slow
def test_plain_vllm_server_on_a_bundle(padded_pair, tmp_path):
    """vLLM's own server on a bundle, no GenARM flag or environment variable: guidance per
    request is exact, and wrong guidance or a prompt holding an id the reward model cannot
    embed (as token ids, or as text) is HTTP 400 naming it; the server keeps serving."""
    from genarm_vllm.bundle import pack
    from genarm_vllm.reference import ReferenceDecoder

    models, extra_id = padded_pair
    bundle = pack(models["base_plus"], [models["arm"]], tmp_path / "bundle", beta=0.5)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(bundle),
               "--dtype", "float32", "--no-enable-chunked-prefill"]
    proc, url, log = start_server(None, tmp_path, [], command)
    try:
        def post(prompt, **body):
            return requests.post(url + "/v1/completions", timeout=60, json={
                "model": "genarm-tiny", "prompt": prompt, "max_tokens": MAX_TOKENS,
                "temperature": 0, "return_token_ids": True, **body})

        want = ReferenceDecoder(models["base_plus"], [models["arm"]], beta=0.25, weights=[-1.0])
        xargs = {"genarm_beta": 0.25, "genarm_weights": [-1.0]}
        got = [post(p, vllm_xargs=xargs).json()["choices"][0]["token_ids"] for p in PROMPTS[:2]]
        assert got == want.generate(PROMPTS[:2], MAX_TOKENS)
        for prompt, body, needle in [
            (PROMPTS[0], {"vllm_xargs": {"genarm_weights": [1.0, 1.0]}}, "genarm_weights"),
            (PROMPTS[0], {"vllm_xargs": {"genarm_beta": 0}}, "genarm_beta"),
            ([5, extra_id, 7], {}, f"prompt token id {extra_id} is beyond reward model"),
            ("the cat <extra_pad> sat", {}, f"prompt token id {extra_id} is beyond reward model"),
        ]:
            response = post(prompt, **body)
            assert response.status_code == 400, response.text
            assert needle in response.json()["error"]["message"]
        assert post(PROMPTS[0]).json()["choices"][0]["token_ids"] == \
            ReferenceDecoder(models["base_plus"], [models["arm"]], beta=0.5).generate(PROMPTS[:1], MAX_TOKENS)[0]
    finally:
        stop_tree(proc)


@pytest.mark.slow
def test_per_model_prompts_over_http(server, client, engine):
    # genarm_prompts: one string per reward model; "<base>" = reads the base's prompt.
    # (The tiny Qwen2 ARM reads the base's prompt: transformers loads its word-level
    # tokenizer as a Qwen2Tokenizer, which tokenizes these words to nothing.)
    xargs = {"genarm_prompts": ["the cat sat on the mat", "<base>"], "genarm_beta": 0.5}
    got = [complete(client, p, xargs).choices[0].token_ids for p in PROMPTS[:3]]
    llm = engine("small+qwen2", ARMS, beta=0.7, weights=[1.0, -0.5])
    want = llm.generate(PROMPTS[:3], SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
                        guidance={"beta": 0.5, "weights": [1.0, 1.0],
                                  "prompts": ["the cat sat on the mat", None]}, use_tqdm=False)
    assert got == [list(o.outputs[0].token_ids) for o in want]
    for bad in (["a"], ["json:[1, 10000000]", "<base>"], ["json:[", "<base>"]):
        body = json.dumps({"model": "genarm-tiny", "prompt": PROMPTS[0], "max_tokens": 4,
                           "vllm_xargs": {"genarm_prompts": bad}})
        response = requests.post(server[1] + "/v1/completions", data=body, timeout=60,
                                 headers={"Content-Type": "application/json"})
        assert response.status_code == 400, response.text
        assert "genarm_prompts" in response.json()["error"]["message"]
    assert len(complete(client, PROMPTS[0]).choices[0].token_ids) == MAX_TOKENS


@pytest.mark.slow
def test_own_chat_templates_over_http_on_a_plain_vllm_server(tiny, chat_arm, tmp_path):
    """vLLM's own server on a bundle packed with own chat templates: in /v1/chat/completions
    the ARM with a chat template of its own reads the messages rendered with it (the other
    ARM renders what the base renders); a request's own genarm_prompts win; content parts
    other than text are HTTP 400."""
    from transformers import AutoTokenizer

    from genarm_vllm.bundle import pack
    from genarm_vllm.reference import ReferenceDecoder
    from genarm_vllm.tokenization import prompt_ids

    arms = [chat_arm, tiny["arm_small"]]
    bundle = pack(tiny["base"], arms, tmp_path / "bundle", beta=0.7, weights=[1.0, 0.5],
                  own_chat_templates=True)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(bundle),
               "--dtype", "float32", "--no-enable-chunked-prefill"]
    proc, url, log = start_server(None, tmp_path, [], command)
    try:
        def chat(messages, **body):
            return requests.post(url + "/v1/chat/completions", timeout=60, json={
                "model": "genarm-tiny", "messages": messages, "max_tokens": MAX_TOKENS,
                "temperature": 0, "ignore_eos": True, "return_token_ids": True, **body})

        ref = ReferenceDecoder(tiny["base"], arms, beta=0.7, weights=[1.0, 0.5])
        tokenizer = AutoTokenizer.from_pretrained(tiny["base"])

        def want(messages, prompts):
            return ref.generate([prompt_ids(tokenizer, messages=messages)], MAX_TOKENS,
                                ignore_eos=True, guidance={"prompts": prompts})[0]

        chats = [[{"role": "user", "content": "the cat sat on the mat"}],
                 [{"role": "system", "content": "we love the sun"},
                  {"role": "user", "content": "a dog"}]]
        for messages in chats:
            got = chat(messages).json()["choices"][0]["token_ids"]
            assert got == want(messages, [messages, None])
        assert got != want(chats[1], [None, None])  # the ARM's own rendering matters
        # A request's own genarm_prompts win.
        got = chat(chats[1], vllm_xargs={"genarm_prompts": ["<base>", "<base>"]})
        assert got.json()["choices"][0]["token_ids"] == want(chats[1], [None, None])
        # Text content parts read as vLLM reads them: joined by newlines.
        parts = [{"role": "user", "content": [{"type": "text", "text": "the cat"},
                                              {"type": "text", "text": "sat on"}]}]
        flat = [{"role": "user", "content": "the cat\nsat on"}]
        assert chat(parts).json()["choices"][0]["token_ids"] == want(flat, [flat, None])
        image = [{"role": "user", "content": [
            {"type": "text", "text": "the cat"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
        response = chat(image)
        assert response.status_code == 400, response.text
        assert "text only" in response.json()["error"]["message"]
        assert len(chat(chats[0]).json()["choices"][0]["token_ids"]) == MAX_TOKENS
    finally:
        stop_tree(proc)
