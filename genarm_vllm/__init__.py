"""GenARM reward-guided decoding on vLLM."""

__version__ = "0.1.0"

__all__ = ["GuidedLLM", "ReferenceDecoder", "mix_logits", "pack"]


def __getattr__(name):
    # Lazy: importing genarm_vllm must not import vLLM (the reference decoder and the
    # training code work without it).
    if name == "GuidedLLM":
        from genarm_vllm.engine.llm import GuidedLLM

        return GuidedLLM
    if name == "ReferenceDecoder":
        from genarm_vllm.reference import ReferenceDecoder

        return ReferenceDecoder
    if name == "mix_logits":
        from genarm_vllm.mixing import mix_logits

        return mix_logits
    if name == "pack":
        from genarm_vllm.bundle import pack

        return pack
    raise AttributeError(f"module 'genarm_vllm' has no attribute {name!r}")
