"""Every guiding model reads its own prompt: per-model views of vLLM's batch (issue 26).

What a request with per-model prompts is (genarm_vllm/prompts.py): a "carrier" request
whose prompt is the base's prompt p_0 followed by the own prompts p_i of the models that
have one, of total length S, with `extra_args["genarm_prompt_lengths"]` saying where each
model's prompt lies (segment (o_i, L_i); models reading the base's prompt use segment 0).
vLLM schedules, caches and preempts the carrier like any request; only the composite
model's forward knows the segments. Each model keeps its own tokens LEFT-ALIGNED in its
OWN KV tensors (every sub-model has its own attention layers, one shared block table):

    carrier position c        model i's token           model position / KV slot
    o_i + j  (j < L_i - 1)    its prompt token j        j
    S - 1                     its last prompt token     L_i - 1
    S + t  (response)         response token t          L_i + t

- The map is increasing, so a chunk of carrier positions [a, b) is a contiguous run of
  each model's positions, and every model position below the run was computed in earlier
  steps (or comes from the prefix cache): chunked prefill, preemption (recompute: the
  resumed request's prefill covers response positions too) and decode all follow.
- Every model processes its last prompt token exactly at carrier position S - 1, the row
  vLLM samples the first response token from, and each response token at the carrier's
  row: the rows vLLM samples carry every model's next-token prediction.
- L_i + t <= S + t: every slot a model writes is allocated by the scheduler for the carrier.
- Each model computes only its own prompt's tokens (no padding, no other model's segment).
- A plain request (no segment info) is the identity map; a batch with no carrier request
  takes the unchanged fast path (model.py does not come here at all).

Per step, `build_views` makes, for every sub-model (the base included), its own input ids,
positions and attention metadata: query_start_loc, seq_lens and slot_mapping computed from
the carrier's (same block table rows), built by a metadata builder of the model's own
attention backend (`AttentionBackend.get_builder_cls()`, as the runner builds its own;
vllm/v1/attention/backend.py CommonAttentionMetadata), and installed, for the duration
of the forward, in the forward context's per-layer dicts (`attn_metadata` and
`slot_mapping`, keyed by layer name: vllm/forward_context.py; read by every Attention
layer through get_attention_context in
vllm/model_executor/layers/attention/attention.py). Why not `subclass_attention_backend`
(the ChunkedLocalAttention pattern): it rewrites CommonAttentionMetadata per backend
class with nothing but that metadata, while the view needs per-request segment info and
changes the token ids and positions the model reads, which only the forward sees.

Where the segment info comes from: the V1 logits processor (logits_processor.py) gets
every request's SamplingParams and prompt ids in `update_state`, which vLLM calls in
`_update_states` (v1/worker/gpu_model_runner.py -> InputBatch.refresh_metadata,
v1/worker/gpu_input_batch.py) BEFORE `_prepare_inputs` and the forward of the same step,
after condense / reorder; its persistent-batch index is the forward's request order. It
keeps index -> RequestPrompts here (REQUEST_PROMPTS, keyed by id(vllm_config) as
step_logits.STEP_LOGITS is). Model Runner V2 (GPU) has no such hook: there the processor
refuses requests with per-model prompts at admission (plain requests are unchanged).

Prefix caching: vLLM hashes the carrier's tokens. A model's left-aligned response KV lies
in blocks whose hash does not cover those responses (slot L_i + t < S + t), so two live
requests sharing such a block would overwrite each other's KV. The frontend therefore
gives each carrier request its own cache_salt (unique per request): carrier requests never
share blocks with other requests (a preempted request still hits its own blocks), and
plain requests keep full prefix caching. See docs/per-model-prompts.md for the limits.

Eager mode only reads these Python-side dicts per call; with torch.compile the
sub-models are compiled with dynamic token counts and attention stays a custom op that
reads the forward context, so the views need no graph of their own; CUDA graphs of the
V1 GPU runner would capture the carrier's metadata, so per-model prompts are for eager
or piecewise mode (documented limit; not run here: no GPU).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from genarm_vllm.prompts import PROMPT_LENGTHS_KEY, check_prompt_lengths, segments

logger = logging.getLogger(__name__)


@dataclass
class RequestPrompts:
    """One carrier request, as the worker needs it."""

    carrier_length: int  # S
    segments: list[tuple[int, int]]  # (offset, length) of the base, then of each reward model
    last_ids: list[int]  # each model's last prompt token id


# id(vllm_config) -> {persistent-batch index: RequestPrompts}, kept by the V1 processor.
REQUEST_PROMPTS: dict[int, dict[int, RequestPrompts]] = {}


def request_prompts(params, prompt_ids, num_reward_models: int) -> RequestPrompts | None:
    """The worker's view of a request (None: a plain request)."""
    lengths = (params.extra_args or {}).get(PROMPT_LENGTHS_KEY)
    if lengths is None or prompt_ids is None:
        return None
    try:
        lengths = check_prompt_lengths(lengths, num_reward_models)
    except ValueError:
        lengths = None
    segs = segments(len(prompt_ids), lengths) if lengths is not None else None
    if segs is None:  # admission checks make this unreachable through GenARM's frontends
        logger.warning("GenARM: %s=%r does not fit a prompt of %d tokens: ignored",
                       PROMPT_LENGTHS_KEY, lengths, len(prompt_ids))
        return None
    if all(seg == segs[0] for seg in segs):  # every model reads the whole prompt
        return None
    return RequestPrompts(len(prompt_ids), segs, [int(prompt_ids[o + n - 1]) for o, n in segs])


@dataclass
class ModelView:
    rows: torch.Tensor  # [n] carrier rows of this model's tokens
    input_ids: torch.Tensor  # [n]
    positions: torch.Tensor  # [n] the model's own positions
    query_start_loc: list[int]  # per kept request
    seq_lens: list[int]
    requests: list[int]  # kept requests (rows of the block table)


def _model_view(m: int, requests: dict[int, RequestPrompts], qsl: list[int], starts: list[int],
                input_ids: torch.Tensor) -> ModelView:
    rows, pos, qsl_out, seq_lens, kept = [], [], [0], [], []
    last_fix: list[tuple[int, int]] = []  # (index in view, id)
    n_view = 0
    for r in range(len(qsl) - 1):
        q0, q1 = qsl[r], qsl[r + 1]
        a = starts[r]
        b = a + (q1 - q0)
        state = requests.get(r)
        parts = []  # (first row, first position, count)
        if state is None:
            parts.append((q0, a, q1 - q0))
        else:
            o, length = state.segments[m]
            s = state.carrier_length
            j0, j1 = max(0, a - o), min(length - 1, b - o)
            if j0 < j1:
                parts.append((q0 + o + j0 - a, j0, j1 - j0))
            if a <= s - 1 < b:
                last_fix.append((n_view + sum(p[2] for p in parts), state.last_ids[m]))
                parts.append((q0 + s - 1 - a, length - 1, 1))
            c0 = max(a, s)
            if c0 < b:
                parts.append((q0 + c0 - a, c0 - s + length, b - c0))
        count = sum(p[2] for p in parts)
        if count == 0:
            continue
        for row, p, n in parts:
            rows.append(torch.arange(row, row + n))
            pos.append(torch.arange(p, p + n))
        n_view += count
        qsl_out.append(n_view)
        last_pos = parts[-1][1] + parts[-1][2] - 1
        seq_lens.append(last_pos + 1)
        kept.append(r)
    device = input_ids.device
    rows_t = torch.cat(rows).to(device) if rows else torch.zeros(0, dtype=torch.long, device=device)
    pos_t = torch.cat(pos).to(device) if pos else torch.zeros(0, dtype=torch.long, device=device)
    ids = input_ids[rows_t].clone()
    for index, token in last_fix:
        ids[index] = token
    return ModelView(rows_t, ids, pos_t.to(torch.int64), qsl_out, seq_lens, kept)


class PromptViews:
    """Per-model views of one composite model (see module doc)."""

    def __init__(self, vllm_config, models: list[torch.nn.Module]):
        self.vllm_config = vllm_config
        self.models = models  # the base's module, then each reward model's
        self._layers: list[list[str]] | None = None
        self._builders: list = [None] * len(models)

    def layer_names(self) -> list[list[str]]:
        if self._layers is None:
            from vllm.model_executor.layers.attention import Attention

            self._layers = [
                [mod.layer_name for mod in model.modules() if isinstance(mod, Attention)]
                for model in self.models
            ]
        return self._layers

    def _builder(self, m: int, device):
        if self._builders[m] is None:
            names = self.layer_names()[m]
            layer = self.vllm_config.compilation_config.static_forward_context[names[0]]
            spec = layer.get_kv_cache_spec(self.vllm_config)
            self._builders[m] = layer.attn_backend.get_builder_cls()(
                spec, names, self.vllm_config, device)
        return self._builders[m]

    def active_requests(self) -> dict[int, RequestPrompts]:
        return REQUEST_PROMPTS.get(id(self.vllm_config)) or {}

    @contextmanager
    def views(self, requests: dict[int, RequestPrompts], input_ids: torch.Tensor,
              positions: torch.Tensor):
        """Yields one ModelView per model, with every model's attention metadata installed
        in the forward context for the duration."""
        from vllm.forward_context import get_forward_context
        from vllm.v1.attention.backend import CommonAttentionMetadata

        context = get_forward_context()
        names = self.layer_names()
        carrier = context.attn_metadata[names[0][0]]
        qsl = carrier.query_start_loc.tolist()
        block_table = getattr(carrier, "block_table", None)
        if block_table is None:
            block_table = carrier.block_table_tensor
        starts = (positions[torch.tensor(qsl[:-1], dtype=torch.long, device=positions.device)].tolist()
                  if len(qsl) > 1 else [])
        if any(r >= len(qsl) - 1 for r in requests):
            raise RuntimeError("GenARM: per-model prompt state of a request outside the batch")
        saved_meta, saved_slots = {}, {}
        views = []
        try:
            for m in range(len(self.models)):
                view = _model_view(m, requests, qsl, starts, input_ids)
                views.append(view)
                if not view.requests:
                    continue
                builder = self._builder(m, input_ids.device)
                block_size = builder.kv_cache_spec.block_size
                kept = torch.tensor(view.requests, dtype=torch.long)
                counts = torch.tensor(view.query_start_loc).diff()
                req_of_token = torch.repeat_interleave(kept, counts)
                pos = view.positions.cpu()
                bt = block_table[kept.to(block_table.device)]
                slots = (block_table.cpu()[req_of_token, pos // block_size].to(torch.int64)
                         * block_size + pos % block_size).to(input_ids.device)
                qsl_t = torch.tensor(view.query_start_loc, dtype=torch.int32)
                seq_t = torch.tensor(view.seq_lens, dtype=torch.int32)
                common = CommonAttentionMetadata(
                    query_start_loc=qsl_t.to(input_ids.device),
                    query_start_loc_cpu=qsl_t,
                    seq_lens=seq_t.to(input_ids.device),
                    num_reqs=len(view.requests),
                    num_actual_tokens=int(view.query_start_loc[-1]),
                    max_query_len=int(counts.max()),
                    max_seq_len=int(seq_t.max()),
                    block_table_tensor=bt,
                    slot_mapping=slots,
                    positions=view.positions,
                )
                meta = builder.build(0, common)
                for name in names[m]:
                    saved_meta[name] = context.attn_metadata[name]
                    saved_slots[name] = context.slot_mapping.get(name)
                    context.attn_metadata[name] = meta
                    context.slot_mapping[name] = slots
            yield views
        finally:
            for name, meta in saved_meta.items():
                context.attn_metadata[name] = meta
                if saved_slots[name] is None:
                    context.slot_mapping.pop(name, None)
                else:
                    context.slot_mapping[name] = saved_slots[name]


def scatter_rows(view: ModelView, hidden: torch.Tensor, num_rows: int, width: int,
                 like: torch.Tensor) -> torch.Tensor:
    """A model's hidden states on the carrier's rows (rows it did not compute: zeros)."""
    out = like.new_zeros((num_rows, width))
    if view.rows.numel():
        out[view.rows] = hidden
    return out
