"""Every guiding model reads its own prompt: per-model views of vLLM's batch (issue 26).

What a request with per-model prompts is (genarm_vllm/prompts.py): a "carrier" request
whose prompt is the base's prompt padded to the longest model prompt's length S, with
`extra_args["genarm_carrier"]` holding each reward model's own prompt ids. vLLM schedules,
caches and preempts the carrier like any request; only the composite model's forward
knows where each model's tokens are (`CarrierLayout`, prompts.py). Every sub-model has
its own attention layers (its own KV tensors under the one block table); model m, with a
prompt of L tokens, starts at the block boundary s = ((S - L) // B) * B:

    carrier row               model m's token           its position / KV slot
    s + j  (j < L - 1)        its prompt token j        j / s + j
    S - 1                     its last prompt token     L - 1 / s + L - 1
    S + t  (response)         response token t          L + t / s + L + t

- Rows increase with positions, so a chunk of rows [a, b) is a contiguous run of each
  model's tokens, every earlier one computed in earlier steps or found in the prefix
  cache: chunked prefill, preemption (recompute: the resumed prefill covers response rows
  too) and decode all follow. Slots never exceed rows: every slot a model writes is
  allocated by the scheduler for the carrier.
- Every model processes its last prompt token at row S - 1, the row vLLM samples the
  first response token from, and each response token at the carrier's row: the rows
  vLLM samples carry every model's next-token prediction.
- Each model's attention reads the block table from block s // B on (a block boundary,
  so the table is only shifted), with its own positions: the model sees only its tokens.
- Each model computes only its own prompt's tokens (no padding, no other model's prompt).
- A plain request (no carrier info) is the identity map; a batch with no carrier request
  takes the unchanged fast path (model.py does not come here at all).

Prefix caching: a regular prompt token's slot is its row, so the KV of rows [0, H) is
exactly what the carrier computes at those rows; the carrier's cache_salt is a digest of
every model's prompt (carrier.py), so only requests with the same prompts share blocks,
and a repeat hits. Beyond `CarrierLayout.cacheable_tokens()` a model's slots hold its last
prompt token and its response, which no block hash covers: the plugin gives a carrier's
blocks there hashes private to the request (plugin._cap_carrier_block_hashes), so such a
block is never shared, and no request ever writes into a block another one hit.

Per step, `PromptViews.views` makes, for every sub-model (the base included), its own input ids,
positions and attention metadata: query_start_loc, seq_lens and slot_mapping computed from
the carrier's (the same block table rows, shifted), built by a metadata builder of the model's own
attention backend (`AttentionBackend.get_builder_cls()`, as the runner builds its own;
vllm/v1/attention/backend.py CommonAttentionMetadata), and installed, for the duration
of the forward, in the forward context's per-layer dicts (`attn_metadata` and
`slot_mapping`, keyed by layer name: vllm/forward_context.py; read by every Attention
layer through get_attention_context in
vllm/model_executor/layers/attention/attention.py). Why not `subclass_attention_backend`
(the ChunkedLocalAttention pattern): it rewrites CommonAttentionMetadata per backend
class with nothing but that metadata, while the view needs per-request carrier info and
changes the token ids and positions the model reads, which only the forward sees.

Where the carrier info comes from: the V1 logits processor (logits_processor.py) gets
every request's SamplingParams and prompt ids in `update_state`, which vLLM calls in
`_update_states` (v1/worker/gpu_model_runner.py -> InputBatch.refresh_metadata,
v1/worker/gpu_input_batch.py) BEFORE `_prepare_inputs` and the forward of the same step,
after condense / reorder; its persistent-batch index is the forward's request order. It
keeps index -> RequestPrompts here (REQUEST_PROMPTS, keyed by id(vllm_config) as
step_logits.STEP_LOGITS is). Model Runner V2 (GPU) has no such hook: there the processor
refuses requests with per-model prompts at admission (plain requests are unchanged).

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

from genarm_vllm.prompts import CARRIER_KEY, CarrierLayout, check_carrier

logger = logging.getLogger(__name__)


@dataclass
class RequestPrompts:
    """One carrier request, as the worker needs it."""

    layout: CarrierLayout
    prompt_ids: list[list[int]]  # the base's prompt ids, then each reward model's


# id(vllm_config) -> {persistent-batch index: RequestPrompts}, kept by the V1 processor.
REQUEST_PROMPTS: dict[int, dict[int, RequestPrompts]] = {}


def request_prompts(params, prompt_ids, num_reward_models: int) -> RequestPrompts | None:
    """The worker's view of a request (None: a plain request)."""
    info = (params.extra_args or {}).get(CARRIER_KEY)
    if info is None or prompt_ids is None:
        return None
    try:
        info = check_carrier(info, num_reward_models, len(prompt_ids))
    except ValueError as e:  # admission checks make this unreachable through GenARM's frontends
        logger.warning("GenARM: %s; the request runs as a plain one", e)
        return None
    base = [int(t) for t in prompt_ids[:info["base_length"]]]
    ids = [base] + [base if own is None else list(own) for own in info["prompt_ids"]]
    return RequestPrompts(CarrierLayout(len(prompt_ids), info), ids)


@dataclass
class ModelView:
    rows: torch.Tensor  # [n] carrier rows of this model's tokens
    input_ids: torch.Tensor  # [n]
    positions: torch.Tensor  # [n] the model's own positions
    query_start_loc: list[int]  # per kept request
    seq_lens: list[int]
    requests: list[int]  # kept requests (rows of the block table)
    block_shifts: list[int]  # per kept request: the model's first block (layout start // B)


def _model_view(m: int, requests: dict[int, RequestPrompts], qsl: list[int], starts: list[int],
                input_ids: torch.Tensor) -> ModelView:
    rows, pos, ids, qsl_out, seq_lens, kept, shifts = [], [], [], [0], [], [], []
    n_view = 0
    for r in range(len(qsl) - 1):
        q0, q1 = qsl[r], qsl[r + 1]
        a = starts[r]  # the carrier row of this request's first scheduled token
        b = a + (q1 - q0)
        state = requests.get(r)
        parts = []  # (first batch row, first position, count, prompt ids or None: the batch's)
        shift = 0
        if state is None:
            parts.append((q0, a, q1 - q0, None))
        else:
            layout, prompt = state.layout, state.prompt_ids[m]
            start, length, carrier_length = layout.starts[m], layout.lengths[m], layout.length
            shift = start // layout.block_size
            j0, j1 = max(0, a - start), min(length - 1, b - start)
            if j0 < j1:  # regular prompt tokens
                parts.append((q0 + start + j0 - a, j0, j1 - j0, prompt[j0:j1]))
            if a <= carrier_length - 1 < b:  # the last prompt token
                parts.append((q0 + carrier_length - 1 - a, length - 1, 1, prompt[-1:]))
            c0 = max(a, carrier_length)
            if c0 < b:  # response tokens
                parts.append((q0 + c0 - a, c0 - carrier_length + length, b - c0, None))
        count = sum(p[2] for p in parts)
        if count == 0:
            continue
        for row, p, n, prompt_part in parts:
            rows.append(torch.arange(row, row + n))
            pos.append(torch.arange(p, p + n))
            ids.append(input_ids[row:row + n] if prompt_part is None
                       else torch.tensor(prompt_part, dtype=input_ids.dtype, device=input_ids.device))
        n_view += count
        qsl_out.append(n_view)
        seq_lens.append(parts[-1][1] + parts[-1][2])
        kept.append(r)
        shifts.append(shift)
    device = input_ids.device
    rows_t = torch.cat(rows).to(device) if rows else torch.zeros(0, dtype=torch.long, device=device)
    pos_t = torch.cat(pos).to(device) if pos else torch.zeros(0, dtype=torch.long, device=device)
    ids_t = torch.cat(ids) if ids else input_ids[:0]
    return ModelView(rows_t, ids_t, pos_t.to(torch.int64), qsl_out, seq_lens, kept, shifts)


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
                if any(requests[r].layout.block_size != block_size
                       for r in view.requests if r in requests):
                    raise RuntimeError("GenARM: a carrier request laid out for another KV "
                                       f"block size than this engine's ({block_size})")
                kept = torch.tensor(view.requests, dtype=torch.long)
                counts = torch.tensor(view.query_start_loc).diff()
                req_of_token = torch.repeat_interleave(kept, counts)
                shift_of_token = torch.repeat_interleave(torch.tensor(view.block_shifts), counts)
                pos = view.positions.cpu()
                slots = (block_table.cpu()[req_of_token, shift_of_token + pos // block_size]
                         .to(torch.int64) * block_size + pos % block_size).to(input_ids.device)
                bt = block_table[kept.to(block_table.device)]
                if any(view.block_shifts):  # each model's table starts at its first block
                    width = bt.shape[1]
                    cols = (torch.arange(width, device=bt.device)[None, :]
                            + torch.tensor(view.block_shifts, device=bt.device)[:, None])
                    bt = bt.gather(1, cols.clamp(max=width - 1))
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
