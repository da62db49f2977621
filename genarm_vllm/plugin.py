"""vLLM plugin entry point (group `vllm.general_plugins`): runs in every vLLM process."""


def register() -> None:
    from vllm import ModelRegistry

    from genarm_vllm.guidance import ARCHITECTURE

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # By name, so the class (and its vLLM imports) load only where the model is built.
        ModelRegistry.register_model(ARCHITECTURE, "genarm_vllm.model:GenARMForCausalLM")
