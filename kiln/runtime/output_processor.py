"""From sampled token ids to what users see: text deltas, stop checks, RequestOutputs.

Requests with n > 1 are a group of sequences sharing one request id; the group's output
holds one CompletionOutput per sequence and is finished when all of them are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.runtime import grammar
from kiln.runtime.request import CompletionOutput, Request, RequestOutput, RequestStatus
from kiln.tokenizer import IncrementalDetokenizer


@dataclass
class Sequence:
    """Engine-side state of one generated sequence: its text and detokenizer."""

    request: Request
    index: int
    group_id: str
    detok: IncrementalDetokenizer | None
    text: str = ""


@dataclass
class Group:
    request_id: str
    prompt: str | None
    sequences: list[Sequence]
    prompt_logprobs: list[dict[int, float] | None] | None = None
    held_back: list[Request] = field(default_factory=list)  # siblings waiting for prefill

    @property
    def finished(self) -> bool:
        return all(s.request.status.finished for s in self.sequences)

    def output(self) -> RequestOutput:
        completions = []
        for seq in self.sequences:
            r = seq.request
            wants_lp = r.params.logprobs is not None
            completions.append(CompletionOutput(
                index=seq.index, text=seq.text, token_ids=r.output_token_ids,
                finish_reason=r.finish_reason, stop_reason=r.stop_reason,
                cumulative_logprob=r.cumulative_logprob if wants_lp else None,
                logprobs=list(r.logprobs) if wants_lp else None))
        first = self.sequences[0].request
        return RequestOutput(self.request_id, self.prompt, first.prompt_token_ids, completions,
                             self.finished, first.stats, self.prompt_logprobs)


def apply_token(seq: Sequence, token: int, index: int,
                logprobs: tuple[list[float], list[int]] | None) -> RequestStatus | None:
    """Put a sampled token at its place in the sequence (where a placeholder stood);
    return the finish status if the sequence must stop there."""
    request, params = seq.request, seq.request.params
    request.token_ids[index] = token
    generated = index + 1 - request.num_prompt_tokens
    if logprobs is not None and params.logprobs is not None:
        values, ids = logprobs
        entry = {ids[0]: values[0]}
        entry.update(zip(ids[1:params.logprobs + 1], values[1:params.logprobs + 1]))
        request.logprobs.append(entry)
        request.cumulative_logprob += values[0]
    text_before = len(seq.text)
    if seq.detok is not None:
        seq.text += seq.detok.add(token)
    status = None
    # The grammar follows every token (min_tokens or not); complete JSON ends the text.
    json_complete = request.grammar is not None and grammar.advance(request, token)
    if generated >= params.min_tokens:
        if not params.ignore_eos and token in request.eos_token_ids:
            status = RequestStatus.FINISHED_STOPPED
        elif token in params.stop_token_ids:
            status, request.stop_reason = RequestStatus.FINISHED_STOPPED, token
        elif json_complete:
            status = RequestStatus.FINISHED_STOPPED
        elif params.stop:
            status = _check_stop_strings(seq, text_before)
    if status is None and generated >= request.max_tokens:
        status = RequestStatus.FINISHED_LENGTH
    if status is not None:
        del request.token_ids[index + 1:]  # a later step's in-flight token is dropped
    return status


def _check_stop_strings(seq: Sequence, text_before: int) -> RequestStatus | None:
    params = seq.request.params
    # A new match must end inside the new text: search from just before it.
    start = max(0, text_before - max(map(len, params.stop)) + 1)
    for stop in params.stop:
        index = seq.text.find(stop, start)
        if index >= 0:
            end = index + len(stop) if params.include_stop_str_in_output else index
            seq.text = seq.text[:end]
            seq.request.stop_reason = stop
            return RequestStatus.FINISHED_STOPPED
    return None
