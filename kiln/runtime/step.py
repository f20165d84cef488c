"""What one launched engine step hands back: the sampled tokens still on the device
(PendingStep) and, once the host has them, the StepResult the engine applies."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from kiln.runtime.profiling import phase
from kiln.runtime.request import Request

# Seconds the host has spent waiting for sampled tokens (CUDA), summed over all steps:
# kiln bench reads it per step. A step in which the host never waits was bound by the
# host's own work (scheduling, inputs, applying tokens), not by the device.
TOKEN_WAIT = [0.0]


@dataclass
class StepResult:
    """Sampled tokens of the requests that sampled, in schedule order (host lists)."""

    requests: list[Request]
    token_ids: list[int]
    indices: list[int]  # where in request.token_ids each sampled token belongs
    logprobs: list[list[float]] | None = None  # per row: [sampled, top1..topn]
    logprob_ids: list[list[int]] | None = None
    # request id -> (first position, one {token: logprob} per prompt position computed)
    prompt_logprobs: dict[str, tuple[int, list[dict[int, float]]]] = field(
        default_factory=dict)


@dataclass
class PendingStep:
    """A launched step whose sampled tokens may still be in flight on the device."""

    requests: list[Request]
    indices: list[int]
    tokens: torch.Tensor | None  # [num sampled] on the device
    logprobs: torch.Tensor | None
    logprob_ids: torch.Tensor | None
    prompt_logprobs: dict[str, tuple[int, list[dict[int, float]]]]
    ready: torch.cuda.Event | None = None  # tokens received on a side stream (PP)
    received: list[Any] | None = None  # CPU pipeline: the broadcasts' works to wait on
    # Pinned host copies of (tokens, logprobs, logprob_ids), enqueued right behind the
    # sampling, and the event that marks them complete (CUDA only).
    host: tuple[torch.Tensor | None, ...] | None = None
    copied: torch.cuda.Event | None = None

    def row_of(self) -> dict[str, int]:
        return {r.request_id: i for i, r in enumerate(self.requests)}

    def copy_to_host(self) -> None:
        """Start the tokens' trip to the host on the current stream, now. Waiting for them
        in result() then ends with this step's sampling; a plain .tolist() there would
        queue behind the next step, already launched by overlap scheduling, and the device
        would sit idle while the host applied the tokens and scheduled the step after."""
        if self.tokens is None or not self.tokens.is_cuda:
            return

        def pinned(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            return out.copy_(t, non_blocking=True)

        self.host = tuple(pinned(t) for t in (self.tokens, self.logprobs, self.logprob_ids))
        self.copied = torch.cuda.Event()
        self.copied.record()

    def result(self) -> StepResult:
        """Wait for the device and bring the tokens to the host (the step's one sync)."""
        if self.tokens is None:
            return StepResult([], [], [], prompt_logprobs=self.prompt_logprobs)
        with phase("kiln.wait_tokens"):
            if self.copied is not None and self.host is not None:
                started = time.perf_counter()
                self.copied.synchronize()
                TOKEN_WAIT[0] += time.perf_counter() - started
                tokens, logprobs, logprob_ids = self.host
            else:
                for work in self.received or ():
                    work.wait()
                if self.ready is not None:
                    torch.cuda.current_stream(self.tokens.device).wait_event(self.ready)
                tokens, logprobs, logprob_ids = self.tokens, self.logprobs, self.logprob_ids
            return StepResult(
                self.requests, tokens.tolist(), self.indices,  # type: ignore[union-attr]
                logprobs.tolist() if logprobs is not None else None,
                logprob_ids.tolist() if logprob_ids is not None else None,
                self.prompt_logprobs)
