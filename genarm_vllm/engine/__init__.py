"""GenARM inside vLLM: the composite model (base + reward models, each with its own paged KV
cache), LoRA ARMs on the base's weights, the per-request logits processor and its step
hand-off, the vLLM plugin, load-time validation, engine defaults, and `GuidedLLM`.

Light on purpose: vLLM imports `genarm_vllm.engine.plugin` in every process, so nothing here
imports vLLM until a module that needs it is imported.
"""
