"""Tiny random models built locally (no model hub anywhere): for tests and quick benchmarks.

One word-level tokenizer is trained on the fly; the base and every reward model share
it. Weights use a large initializer range so next-token distributions are peaked and
greedy comparisons are not decided by near-ties.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

WORDS = (
    "the a cat dog sat ran on under mat tree happy sad good bad very quite big small red "
    "blue green house car road river sun moon star day night is was and or but not it he "
    "she they we you i love hate like see saw went go came come eat ate drink food water "
    "kind cruel bright dark warm cold fast slow nice awful great terrible calm angry"
).split()

SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>"]

# Shapes: head sizes must be ones the vLLM CPU attention backend supports (32, 64, ...).
BASE_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)
SMALL_ARM_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=1, num_key_value_heads=1)


# Prompts of the tiny tests: short and long, in the tiny tokenizer's words.
PROMPTS = [
    "the cat sat on",
    "a dog",
    "happy sun is very warm and bright and the moon is cold",
    "we",
    "she saw the big red car on the road and",
    "they love green trees",
]


def random_corpus(num_lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) for _ in range(num_lines)]


def build_tokenizer(
    path: str | Path, extra_words: tuple[str, ...] = (), corpus_seed: int = 0
) -> PreTrainedTokenizerFast:
    """Train a word-level tokenizer on a random corpus and save it to `path`.

    Ids follow word frequency: another corpus_seed gives the same words other ids (a
    different tokenizer); extra_words, seen once, get the last ids.
    """
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS)
    tokenizer.train_from_iterator(random_corpus(seed=corpus_seed) + [" ".join(extra_words)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<pad>",
        bos_token="<s>", eos_token="</s>",
    )
    fast.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    fast.save_pretrained(str(path))
    return fast


def with_added_tokens(tokenizer_dir: str | Path, path: str | Path, tokens: tuple[str, ...]):
    """The tokenizer of `tokenizer_dir` plus special tokens at the end (as the Tulu2 ARM's
    `<pad>`, id 32000, sits after its base's 32,000 tokens), saved to `path`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokenizer.add_special_tokens({"additional_special_tokens": list(tokens)})
    tokenizer.save_pretrained(str(path))
    return tokenizer


def build_model(
    path: str | Path,
    tokenizer: PreTrainedTokenizerFast,
    *,
    family: str = "llama",
    seed: int = 0,
    vocab_padding: int = 0,
    initializer_range: float = 0.3,
    max_position_embeddings: int = 512,
    **shape,
) -> Path:
    """Save a random causal LM of the given family/shape, with `tokenizer`, to `path`."""
    shape = {**BASE_SHAPE, **shape}
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[family]
    config = config_cls(
        vocab_size=len(tokenizer) + vocab_padding,
        max_position_embeddings=max_position_embeddings,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **shape,
    )
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32).eval()
    if family == "qwen2":  # make the q/k/v biases matter (they init to zero)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias"):
                    p.normal_(0, initializer_range)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return Path(path)


def build_tiny_family(root: str | Path) -> dict[str, Path]:
    """The standard set of tiny models used by the tests, under `root`.

    base:       Llama, hidden 128, 2 layers, 4 heads / 2 KV heads (head size 32)
    arm_same:   the base's shape, other weights
    arm_small:  hidden 64, 1 layer, 1 head / 1 KV head (head size 64), smaller vocab padding
    arm_qwen2:  Qwen2 family (q/k/v biases), hidden 64, 2 heads / 1 KV head
    """
    root = Path(root)
    tokenizer = build_tokenizer(root / "tokenizer")
    return {
        "base": build_model(root / "base", tokenizer, seed=1, vocab_padding=12),
        "arm_same": build_model(root / "arm_same", tokenizer, seed=2, vocab_padding=12),
        "arm_small": build_model(root / "arm_small", tokenizer, seed=3, vocab_padding=3,
                                 **SMALL_ARM_SHAPE),
        "arm_qwen2": build_model(root / "arm_qwen2", tokenizer, family="qwen2", seed=4,
                                 hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1),
    }


def record_loaded_parameter_bytes() -> None:
    """From now on, every GenARM model built in this process notes `loaded_parameter_bytes`:
    the bytes of its parameters right after loading, before vLLM's CPU repacking leaves empty
    placeholders behind (tests and benchmarks compare the weight memory of engines)."""
    from genarm_vllm.engine.model import GenARMForCausalLM

    load = GenARMForCausalLM.load_weights
    if getattr(load, "records_bytes", False):
        return

    def load_weights(self, weights):
        loaded = load(self, weights)
        self.loaded_parameter_bytes = sum(p.numel() * p.element_size() for p in self.parameters())
        return loaded

    load_weights.records_bytes = True
    GenARMForCausalLM.load_weights = load_weights
