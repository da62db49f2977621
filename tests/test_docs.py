"""The runnable examples of README.md and docs/*.md, run as written.

Every ```bash / ```python block of these pages carries a marker on the line before it
(docs/README.md explains them):

    <!-- example -->                    run it (in the page's folder, after the page's
                                         earlier examples); it must exit 0
    <!-- example: expect "TEXT" -->     ... and its output must contain TEXT (repeatable)
    <!-- example: tiny-models -->       the page's setup block: builds tiny random models
                                         into ./tiny (run once per session, copied)
    <!-- example: server -->            a server: started in the background, waited for on
                                         the block's --port, stopped when the page ends
    <!-- example: copy of PAGE -->      the same text as a checked example of PAGE
                                         (the README's tour repeats the docs' examples)
    <!-- not-checked: REASON -->        not run here (GPUs, clusters, hours), with why

test_every_block_is_marked (fast) fails on a block without a marker, so no example drifts
out of the check unnoticed. test_page (slow) runs each page's examples in a fresh folder.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from genarm_vllm.runtime import LOCAL_ENV

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))
RUN_LANGUAGES = {"bash", "sh", "python"}
BLOCK = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
MARKER = re.compile(r"<!--\s*(example|not-checked)\s*(?::\s*(.*?))?\s*-->\s*$", re.S)
BLOCK_TIMEOUT = 900


def blocks(page: str) -> list[dict]:
    """Every fenced block of `page`: language, text, line and its marker (or None)."""
    text = (ROOT / page).read_text()
    found = []
    for match in BLOCK.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.search(before)
        kind, arg = (marker.group(1), (marker.group(2) or "").strip()) if marker else (None, "")
        found.append(dict(language=match.group(1), text=match.group(2), kind=kind, arg=arg,
                          line=text[: match.start()].count("\n") + 1, page=page))
    return found


def runnable(page: str) -> list[dict]:
    return [b for b in blocks(page) if b["language"] in RUN_LANGUAGES]


def where(block) -> str:
    return f"{block['page']}:{block['line']}"


def test_every_block_is_marked():
    """Each bash/python block says whether it is checked; copies match their original."""
    unmarked, bad_copies, bad_markers = [], [], []
    for page in PAGES:
        for block in runnable(page):
            if block["kind"] is None:
                unmarked.append(where(block))
            elif block["kind"] == "not-checked" and not block["arg"]:
                bad_markers.append(where(block) + " (not-checked needs a reason)")
            elif block["kind"] == "example" and block["arg"].startswith("copy of "):
                source = block["arg"][len("copy of "):].strip()
                if source not in PAGES:
                    bad_markers.append(f"{where(block)} (no page {source})")
                    continue
                originals = [b["text"] for b in runnable(source)
                             if b["kind"] == "example" and not b["arg"].startswith("copy of ")]
                if block["text"] not in originals:
                    bad_copies.append(f"{where(block)} is not a checked example of {source}")
            elif block["kind"] == "example" and block["arg"] and not re.fullmatch(
                    r'tiny-models|server|(expect "[^"]*"\s*)+', block["arg"]):
                bad_markers.append(f"{where(block)} (unknown marker {block['arg']!r})")
    assert not unmarked, "blocks without <!-- example --> or <!-- not-checked: ... -->: " + ", ".join(unmarked)
    assert not bad_copies, "; ".join(bad_copies)
    assert not bad_markers, "; ".join(bad_markers)
    setups = {b["text"] for p in PAGES for b in runnable(p) if b["arg"] == "tiny-models"}
    assert len(setups) <= 1, f"the tiny-models blocks differ: {setups}"


def example_env() -> dict:
    """The tests' environment (one OpenMP thread, in-process engines, no hub) with the
    project's .venv first on PATH, so `python` and `genarm-vllm` are the project's."""
    env = {**os.environ, **LOCAL_ENV}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    return env


def command(block, folder: Path, number: int) -> list[str]:
    if block["language"] == "python":
        script = folder / f"example_{number}.py"
        script.write_text(block["text"])
        return [sys.executable, script.name]
    script = folder / f"example_{number}.sh"
    script.write_text(block["text"])
    return ["bash", "-e", "-o", "pipefail", script.name]


def port_of(block) -> int:
    match = re.search(r"--port\s+(\d+)", block["text"])
    assert match, f"{where(block)}: a server example must name its --port"
    return int(match.group(1))


def wait_for_server(proc, port: int, log: Path, block) -> None:
    import requests

    deadline = time.time() + 600
    while time.time() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(1)
    pytest.fail(f"{where(block)}: the server did not start:\n{log.read_text()[-5000:]}")


def stop(proc) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Runs the (single) tiny-models setup block once; pages get a copy of ./tiny."""
    made = {}

    def get(block):
        if "folder" not in made:
            folder = tmp_path_factory.mktemp("tiny-models")
            result = subprocess.run(command(block, folder, 0), cwd=folder, env=example_env(),
                                    capture_output=True, text=True, timeout=BLOCK_TIMEOUT)
            assert result.returncode == 0, f"{where(block)} failed:\n{result.stdout}\n{result.stderr}"
            made["folder"] = folder
        return made["folder"] / "tiny"

    return get


def own_examples(page: str) -> list[dict]:
    """The page's runnable examples, less copies of other pages' (test_every_block_is_marked
    checks those)."""
    return [b for b in runnable(page) if b["kind"] == "example"
            and not b["arg"].startswith("copy of ")]


@pytest.mark.slow
@pytest.mark.parametrize("page", [page for page in PAGES if own_examples(page)])
def test_page(page, tmp_path, tiny_models):
    """The page's examples, in order, in an empty folder: each exits 0 (and prints what
    its marker expects)."""
    examples = own_examples(page)
    servers = []
    try:
        for number, block in enumerate(examples, 1):
            if block["arg"] == "tiny-models":
                shutil.copytree(tiny_models(block), tmp_path / "tiny")
                continue
            cmd = command(block, tmp_path, number)
            if block["arg"] == "server":
                port = port_of(block)
                with socket.socket() as s:
                    assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} is taken"
                log = tmp_path / f"server_{number}.log"
                env = {**example_env(), "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}  # a server's mode
                proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log.open("w"),
                                        stderr=subprocess.STDOUT, start_new_session=True)
                servers.append(proc)
                wait_for_server(proc, port, log, block)
                continue
            start = time.time()
            result = subprocess.run(cmd, cwd=tmp_path, env=example_env(), capture_output=True,
                                    text=True, timeout=BLOCK_TIMEOUT)
            output = result.stdout + result.stderr
            print(f"{where(block)}: exit {result.returncode} in {time.time() - start:.0f} s")
            assert result.returncode == 0, f"{where(block)} failed:\n{output[-6000:]}"
            for expected in re.findall(r'expect "([^"]*)"', block["arg"]):
                assert expected in output, f"{where(block)}: {expected!r} not in:\n{output[-6000:]}"
    finally:
        for proc in servers:
            stop(proc)
