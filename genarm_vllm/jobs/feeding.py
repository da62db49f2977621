"""Continuous feeding: one request at a time into a GuidedLLM's vLLM engine, results as they finish.

`LLM.generate` over a chunk of rows returns only when the chunk's longest generation ends,
so the batch empties behind it at every chunk boundary. This feeder uses vLLM's own
request-level API instead (`LLMEngine.add_request` with the token ids of a prompt, then
`LLMEngine.step`, the loop `LLM.generate` itself runs): the job adds a row whenever one
finishes, and the engine stays full for the whole job. Guidance is attached as
`GuidedLLM.generate` attaches it, and prompts are token ids, as the batch job gives
`generate`, so the output is the same.
"""

from __future__ import annotations

import itertools
import uuid

from genarm_vllm.guidance import request_guidance, resolve_guidance, with_guidance

# Requests kept in the engine per sequence it runs at once (max_num_seqs): the surplus
# waits in vLLM's queue, so a finished sequence is replaced at the very next step.
IN_FLIGHT_PER_SEQ = 2


def refusal_types() -> tuple[type[BaseException], ...]:
    """Exceptions with which vLLM refuses one request (not the engine as a whole)."""
    from vllm.exceptions import VLLMClientError

    return (ValueError, TypeError, VLLMClientError)


class EngineFeeder:
    """Adds requests to one GuidedLLM's engine and collects the finished ones, by key."""

    def __init__(self, llm, sampling_params, max_in_flight: int | None = None):
        self.llm = llm
        self.engine = llm.llm.llm_engine
        from vllm.sampling_params import RequestOutputKind

        request_guidance(sampling_params, len(llm.reward_models))  # guidance in extra_args
        # One copy for every row without its own guidance (vLLM copies it per request, as
        # in LLM.generate); final outputs only, as LLM.generate asks.
        self.sampling_params = sampling_params.clone()
        self.sampling_params.output_kind = RequestOutputKind.FINAL_ONLY
        max_num_seqs = self.engine.vllm_config.scheduler_config.max_num_seqs
        self.max_in_flight = max_in_flight or IN_FLIGHT_PER_SEQ * max_num_seqs
        self._keys: dict[str, object] = {}  # vLLM request id -> the caller's key
        self._counter = itertools.count()
        self._prefix = f"genarm-job-{uuid.uuid4().hex[:8]}-"  # unique per feeder of an engine

    @property
    def in_flight(self) -> int:
        return len(self._keys)

    def has_room(self) -> bool:
        return self.in_flight < self.max_in_flight

    def wants_rows(self) -> bool:
        """Time to top up: a quarter of the window is free. Rows then go in as a bunch, not
        a few after every step, so the job's own work between steps comes in few, larger
        gaps (vLLM's waiting queue still holds the rest of the window)."""
        return self.in_flight <= self.max_in_flight - max(1, self.max_in_flight // 4)

    def add(self, key, prompt, guidance: dict | None) -> None:
        """Submit one prompt; refusal_types() when vLLM refuses it (the engine goes on)."""
        params = self.sampling_params
        carrier = temperature = None
        if guidance is not None:
            guidance = dict(guidance)
            # A carrier prompt's genarm_carrier (per-model prompts: batch.PromptBuilder).
            carrier = guidance.pop("carrier", None)
            # A row's own sampling temperature (the row's "temperature": batch.PromptBuilder).
            temperature = guidance.pop("temperature", None)
        if temperature is not None:
            import msgspec

            # replace() runs SamplingParams' own checks: temperature 0 turns greedy there.
            params = msgspec.structs.replace(params.clone(), temperature=temperature)
        if guidance:
            (resolved,) = resolve_guidance([guidance], 1, self.llm.beta, self.llm.weights)
            params = with_guidance(params, *resolved)
        if carrier is not None:
            from genarm_vllm.prompts import CARRIER_KEY

            params = params.clone()
            params.extra_args = {**(params.extra_args or {}), CARRIER_KEY: carrier}
        request_id = f"{self._prefix}{next(self._counter)}"
        # Rendered by the LLM's own renderer, exactly as LLM.generate renders a prompt
        # (a private step of vLLM's; raw prompts are still taken where it is missing).
        render = getattr(self.llm.llm, "_preprocess_cmpl_one", None)
        self.engine.add_request(request_id, render(prompt) if render else prompt, params)
        self._keys[request_id] = key

    def abort(self) -> None:
        """Drop every request still in the engine (a job that stops early leaves none)."""
        if self._keys:
            self.engine.abort_request(list(self._keys))
            self._keys.clear()

    def step(self) -> list[tuple[object, object]]:
        """One engine step: (key, vllm.RequestOutput) of every request it finished."""
        finished = []
        for output in self.engine.step():
            if output.finished:
                finished.append((self._keys.pop(output.request_id), output))
        return finished
