"""GenARMLogitsProcessor against vLLM's real V1 and V2 (Model Runner V2) interfaces.

The V1 path also runs end to end in test_engine.py; Model Runner V2 (the GPU default in
vLLM 0.33) cannot run on this CPU machine, so it is driven here through vLLM's own V2
loader, LogitsProcRequestState and LogitsContext.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext
from vllm.v1.worker.gpu.sample.logits_processor.loader import (
    build_custom_logits_processors,
    build_custom_logits_processors_params_validator,
)

import genarm_vllm.engine.step_logits as genarm_model
from genarm_vllm.engine.logits_processor import (
    GenARMLogitsProcessor,
    GenARMLogitsProcessorV1,
    GenARMLogitsProcessorV2,
    is_genarm_processor,
    processor_for,
)
from genarm_vllm.mixing import mix_logits, tokenizer_scores

VOCAB, WIDTH, DEFAULT_BETA, DEFAULT_WEIGHTS = 40, 44, 1.0, [1.0, 0.5]


def vllm_config():
    hf_config = SimpleNamespace(
        architectures=["GenARMForCausalLM"], genarm_base_architectures=["LlamaForCausalLM"],
        genarm_reward_models=["arm_a", "arm_b"], genarm_beta=DEFAULT_BETA,
        genarm_weights=DEFAULT_WEIGHTS,
    )
    return SimpleNamespace(model_config=SimpleNamespace(hf_config=hf_config))


CONFIG = vllm_config()  # the engine: its model publishes, its processor reads


def guided(beta=None, weights=None):
    extra = {}
    if beta is not None:
        extra["genarm_beta"] = beta
    if weights is not None:
        extra["genarm_weights"] = weights
    return SamplingParams(extra_args=extra or None)


class Step:
    """Random raw logits for `rows` rows, published as GenARMForCausalLM.compute_logits does."""

    def __init__(self, rows, seed=0, small_arm=False):
        g = torch.Generator().manual_seed(seed)
        self.base = torch.randn(rows, WIDTH, generator=g) * 3
        # A reward model with a smaller vocabulary takes the processor's exact path.
        self.arms = [torch.randn(rows, WIDTH, generator=g) * 3,
                     torch.randn(rows, VOCAB - 5 if small_arm else WIDTH, generator=g) * 3]
        step = genarm_model.StepLogits(
            tokenizer_scores(self.base, VOCAB), [tokenizer_scores(a, VOCAB) for a in self.arms],
            WIDTH, torch.tensor([DEFAULT_BETA]), torch.tensor([DEFAULT_WEIGHTS]),
        )
        self.step = step
        self.publish()
        # What compute_logits hands the sampler: every row mixed with the defaults.
        self.logits = step.mix_defaults()

    def publish(self):
        """As compute_logits does at every step (a processor takes each step's logits once)."""
        genarm_model.publish_step_logits(CONFIG, self.step)

    def expected(self, row, beta=DEFAULT_BETA, weights=DEFAULT_WEIGHTS):
        return mix_logits(self.base[row : row + 1], [a[row : row + 1] for a in self.arms],
                            torch.tensor([beta]), torch.tensor([weights]), VOCAB)[0]


@pytest.fixture
def host_buffers(monkeypatch):
    """vLLM's staged-write buffers as on a platform without pinned memory (this CPU)."""
    import vllm.v1.worker.gpu.buffer_utils as buffer_utils

    monkeypatch.setattr(buffer_utils, "is_uva_available", lambda: False)


@pytest.mark.parametrize("small_arm", [False, True])
def test_v2_interface_through_vllms_loader(small_arm, host_buffers):
    req_states = SimpleNamespace(device=torch.device("cpu"), max_num_reqs=8, vocab_size=WIDTH,
                                 all_token_ids=None, prompt_len=None, prefill_len=None,
                                 total_len=None)
    [proc] = build_custom_logits_processors(CONFIG, req_states, False,
                                            (GenARMLogitsProcessorV2,))
    assert proc.add_request(3, guided(0.5, [2.0, -1.0])) is True
    assert proc.add_request(0, guided()) is False  # engine defaults: nothing to re-mix
    assert proc.add_request(5, guided(weights=[0.0, 0.0])) is True
    proc.apply_staged_writes()  # vLLM: once per step, before the forward pass

    step = Step(rows=3, small_arm=small_arm)
    slots = torch.tensor([5, 0, 3])  # rows are reordered every step
    ctx = LogitsContext(
        expanded_idx_mapping=slots, idx_mapping=slots, idx_mapping_np=slots.numpy(),
        expanded_local_pos=torch.zeros(3, dtype=torch.long), input_ids=torch.zeros(3),
        pos=torch.zeros(3), seq_lens_upper_bound_np=np.ones(3),
    )
    logits = step.logits.clone()
    logits[2, 7] = -torch.inf  # a vLLM mask (e.g. structured output) applied before us
    out = proc.apply(logits, ctx)
    torch.testing.assert_close(out[0], step.expected(0, weights=[0.0, 0.0]))
    torch.testing.assert_close(out[1], step.expected(1))
    want = step.expected(2, 0.5, [2.0, -1.0])
    want[7] = -torch.inf
    torch.testing.assert_close(out[2], want)
    assert not torch.isnan(out).any()

    # A recycled slot forgets its previous occupant's guidance.
    assert proc.add_request(3, guided()) is False
    proc.apply_staged_writes()
    step.publish()
    torch.testing.assert_close(proc.apply(step.logits.clone(), ctx)[2], step.expected(2))

    # A step in which no row overrides the defaults is skipped on the host: the logits
    # come back untouched, and no step logits are even looked up.
    assert proc.add_request(5, guided()) is False
    proc.apply_staged_writes()
    genarm_model.STEP_LOGITS.pop(id(CONFIG), None)  # nothing published: a lookup would raise
    untouched = step.logits.clone()
    assert proc.apply(untouched, ctx) is untouched and torch.equal(untouched, step.logits)


@pytest.mark.parametrize("small_arm", [False, True])
def test_v1_interface_follows_batch_updates(small_arm):
    proc = GenARMLogitsProcessorV1(CONFIG, torch.device("cpu"), False)
    assert proc.is_argmax_invariant() is False  # else greedy requests would skip it
    proc.update_state(BatchUpdate(batch_size=3, removed=[], moved=[], added=[
        (0, guided(), [1], []), (1, guided(0.25), [1], []), (2, guided(2.0, [1.0, 1.0]), [1], []),
    ]))
    step = Step(rows=3, seed=1, small_arm=small_arm)
    out = proc.apply(step.logits.clone())
    assert torch.equal(out[0], step.logits[0])  # a row on the defaults is left bit for bit
    torch.testing.assert_close(out[1], step.expected(1, 0.25))
    torch.testing.assert_close(out[2], step.expected(2, 2.0, [1.0, 1.0]))

    # vLLM condenses the batch: request 2 finishes, 0 and 1 swap places.
    proc.update_state(BatchUpdate(batch_size=2, removed=[2], added=[],
                                  moved=[(0, 1, MoveDirectionality.SWAP)]))
    step = Step(rows=2, seed=2, small_arm=small_arm)
    out = proc.apply(step.logits.clone())
    torch.testing.assert_close(out[0], step.expected(0, 0.25))
    torch.testing.assert_close(out[1], step.expected(1))

    proc.update_state(BatchUpdate(batch_size=1, removed=[0], added=[],
                                  moved=[(1, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    step = Step(rows=1, seed=3, small_arm=small_arm)
    logits = step.logits.clone()
    assert proc.apply(logits) is logits and torch.equal(logits[0], step.expected(0))


@pytest.mark.parametrize("extra, message", [
    ({"genarm_beta": 0.0}, "genarm_beta must be a finite number > 0"),
    ({"genarm_beta": float("nan")}, "genarm_beta must be a finite number > 0"),
    ({"genarm_beta": "1"}, "genarm_beta must be a finite number > 0"),
    ({"genarm_weights": [1.0, float("inf")]}, "genarm_weights must be finite numbers"),
    ({"genarm_weights": "1,1"}, "genarm_weights must be a list"),
    ({"genarm_weights": [1.0, 2.0, 3.0]}, r"genarm_weights must have one entry per reward model \(2\)"),
])
@pytest.mark.parametrize("v2_runner", [False, True])
def test_admission_check_names_the_key(extra, message, v2_runner):
    # The processor the plugin configures for an engine with two reward models, loaded by
    # name through each runner's own frontend validator.
    name = processor_for(2, v2_runner)
    if v2_runner:
        validate = build_custom_logits_processors_params_validator([name])
    else:
        from functools import partial

        from vllm.v1.sample.logits_processor import validate_logits_processors_parameters

        validate = partial(validate_logits_processors_parameters, [name])
    with pytest.raises(VLLMValidationError, match=message):
        validate(SamplingParams(extra_args=extra))
    validate(SamplingParams(extra_args={"genarm_beta": 0.5, "genarm_weights": [1, 0]}))


def test_repetition_penalty_with_own_guidance_is_refused_under_v2_only():
    """Model Runner V2 penalizes before logits processors run (the default mix): a request's
    own guidance with a repetition penalty would sample from another distribution there.
    V1 penalizes after (exact, test_engine.py)."""
    penalized = SamplingParams(repetition_penalty=1.3, extra_args={"genarm_beta": 0.5})
    v2 = build_custom_logits_processors_params_validator([processor_for(2, True)])
    with pytest.raises(VLLMValidationError, match="repetition_penalty != 1 are refused under"):
        v2(penalized)
    v2(SamplingParams(repetition_penalty=1.3))  # the engine's defaults: penalized as mixed
    v2(SamplingParams(frequency_penalty=0.5, presence_penalty=0.5, extra_args={"genarm_beta": 0.5}))
    from functools import partial

    from vllm.v1.sample.logits_processor import validate_logits_processors_parameters

    v1 = partial(validate_logits_processors_parameters, [processor_for(2, False)])
    v1(penalized)


def test_processor_classes_by_name_load_and_pickle():
    import pickle

    import genarm_vllm.engine.logits_processor as module

    cls = module.GenARMLogitsProcessor_3rm_v2
    assert (cls.num_reward_models, cls.v2_runner) == (3, True)
    assert issubclass(cls, GenARMLogitsProcessor) and pickle.loads(pickle.dumps(cls)) is cls
    assert processor_for(3, True) == "genarm_vllm.engine.logits_processor:GenARMLogitsProcessor_3rm_v2"
    for entry in (GenARMLogitsProcessor, cls, processor_for(1, False),
                  "genarm_vllm.engine.logits_processor:GenARMLogitsProcessor"):
        assert is_genarm_processor(entry)
    assert not is_genarm_processor("my.mod:Proc") and not is_genarm_processor(SamplingParams)
    with pytest.raises(AttributeError):
        module.GenARMLogitsProcessor_x


def test_step_logits_do_not_outlive_their_step():
    """The K+1 float32 [rows x vocab] tensors of a step are released once the processor
    has run, whether it re-mixed rows or not (else the last step's, e.g. vLLM 0.33's
    max_num_reqs-row dummy run, stay for the engine's life)."""
    proc = GenARMLogitsProcessorV1(CONFIG, torch.device("cpu"), False)
    step = Step(rows=1)
    proc.apply(step.logits.clone())  # no request overrides the defaults
    assert id(CONFIG) not in genarm_model.STEP_LOGITS
    proc.update_state(BatchUpdate(batch_size=1, removed=[], moved=[], added=[
        (0, guided(0.5), [1], [])]))
    step = Step(rows=1)
    torch.testing.assert_close(proc.apply(step.logits.clone())[0], step.expected(0, 0.5))
    assert id(CONFIG) not in genarm_model.STEP_LOGITS


def test_a_row_count_mismatch_keeps_the_defaults_and_the_engine(caplog):
    """Rows that cannot be matched to the model's are left on the default mix, logged; a
    raise here would stop the engine for every request."""
    proc = GenARMLogitsProcessorV1(CONFIG, torch.device("cpu"), False)
    proc.update_state(BatchUpdate(batch_size=2, removed=[], moved=[], added=[
        (0, guided(0.5), [1], []), (1, guided(), [1], [])]))
    step = Step(rows=3)
    logits = step.logits[:2].clone()
    assert proc.apply(logits) is logits and torch.equal(logits, step.logits[:2])
    assert "2 logits rows but the model computed 3" in caplog.text


def test_refuses_a_model_that_is_not_genarm():
    config = vllm_config()
    config.model_config.hf_config.architectures = ["LlamaForCausalLM"]
    with pytest.raises(ValueError, match="needs the GenARMForCausalLM model"):
        GenARMLogitsProcessorV1(config, torch.device("cpu"), False)


def test_each_engine_reads_its_own_step_logits():
    """Two engines in one process: a processor reads the logits of its own engine's model."""
    other = vllm_config()
    mine = Step(rows=2, seed=5)
    theirs = genarm_model.StepLogits(
        tokenizer_scores(torch.zeros(3, WIDTH), VOCAB), [tokenizer_scores(torch.zeros(3, WIDTH), VOCAB)] * 2,
        WIDTH, torch.tensor([DEFAULT_BETA]), torch.tensor([DEFAULT_WEIGHTS]),
    )
    genarm_model.publish_step_logits(other, theirs)  # published after mine
    proc = GenARMLogitsProcessorV1(CONFIG, torch.device("cpu"), False)
    proc.update_state(BatchUpdate(batch_size=2, removed=[], moved=[], added=[
        (0, guided(0.5), [1], []), (1, guided(), [1], [])]))
    out = proc.apply(mine.logits.clone())
    torch.testing.assert_close(out[0], mine.expected(0, 0.5))
    # An engine whose model published nothing yet reads nothing (never another engine's).
    lonely = GenARMLogitsProcessorV1(vllm_config(), torch.device("cpu"), False)
    lonely.update_state(BatchUpdate(batch_size=1, removed=[], moved=[], added=[
        (0, guided(0.5), [1], [])]))
    with pytest.raises(RuntimeError, match="before GenARMForCausalLM computed any logits"):
        lonely.apply(mine.logits[:1].clone())
