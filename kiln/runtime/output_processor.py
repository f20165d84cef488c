"""From sampled token ids to what users see: text deltas, stop checks, RequestOutputs.

Requests with n > 1 are a group of sequences sharing one request id; the group's output
holds one CompletionOutput per sequence and is finished when all of them are.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kiln.runtime import grammar
from kiln.runtime.request import (
    PLACEHOLDER,
    CompletionOutput,
    Request,
    RequestOutput,
    RequestStatus,
)
from kiln.tokenizer import IncrementalDetokenizer

if TYPE_CHECKING:
    from kiln.runtime.scheduler import Scheduler
    from kiln.runtime.step import StepResult


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
        sequences = self.sequences
        if len(sequences) == 1:  # (n = 1: asked per group and step)
            return sequences[0].request.status.finished
        return all(s.request.status.finished for s in sequences)

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
    # The grammar follows every token. It ends on an end token once the JSON is complete,
    # and then nothing may follow: the request stops there even short of min_tokens or
    # with ignore_eos (the grammar wins; min_tokens only held the EOS back while the
    # grammar allowed something else). Where it allowed no token at all (a dead end the
    # compiler could not see), the token is dropped and the request ends with its text
    # so far, finish_reason "abort" and stop_reason saying why.
    json_complete = request.grammar is not None and grammar.advance(request, token)
    if json_complete is None:
        del request.token_ids[index:]
        request.stop_reason = grammar.dead_end_reason(request)
        return RequestStatus.FINISHED_ABORTED
    request.token_ids[index] = token
    generated = index + 1 - request.num_prompt_tokens
    if logprobs is not None and params.logprobs is not None:
        values, ids = logprobs
        entry = {ids[0]: values[0]}
        entry.update(zip(ids[1:params.logprobs + 1], values[1:params.logprobs + 1]))
        request.logprobs.append(entry)
        request.cumulative_logprob += values[0]
    text_before = len(seq.text) if params.stop else 0
    status = None
    if generated >= params.min_tokens or json_complete:
        if not params.ignore_eos and token in request.eos_token_ids:
            status = RequestStatus.FINISHED_STOPPED
        elif token in params.stop_token_ids:
            status, request.stop_reason = RequestStatus.FINISHED_STOPPED, token
        elif json_complete:
            status = RequestStatus.FINISHED_STOPPED
    # A stop token (EOS, stop_token_ids, the grammar's end) stays out of the text, as in
    # vLLM, unless include_stop_str_in_output (its id stays in token_ids).
    if seq.detok is not None and (status is None or params.include_stop_str_in_output):
        seq.text += seq.detok.add(token)
    if generated >= params.min_tokens and status is None and params.stop:
        status = _check_stop_strings(seq, text_before)
    if status is None and generated >= request.max_tokens:
        status = RequestStatus.FINISHED_LENGTH
    if status is not None:
        del request.token_ids[index + 1:]  # a later step's in-flight token is dropped
    return status


def _check_stop_strings(seq: Sequence, text_before: int) -> RequestStatus | None:
    params = seq.request.params
    # A new match must end inside the new text: each stop string is searched from just
    # before it (from its own length back: a shorter one found from the longest one's
    # start could lie wholly in text made before min_tokens allowed a stop, and be cut).
    # The earliest match stops it (at one place: the one listed first), so the text keeps
    # no other stop string (vLLM takes the first one listed that matches anywhere).
    text = seq.text
    found = [(index, stop) for stop in params.stop
             if (index := text.find(stop, max(0, text_before - len(stop) + 1))) >= 0]
    if not found:
        return None
    index, stop = min(found, key=lambda match: match[0])
    end = index + len(stop) if params.include_stop_str_in_output else index
    seq.text = seq.text[:end]
    seq.request.stop_reason = stop
    return RequestStatus.FINISHED_STOPPED


def apply_result(result: StepResult, seq_of: dict[str, Sequence], groups: dict[str, Group],
                 scheduler: Scheduler) -> dict[str, Group]:
    """Apply a step's sampled tokens and prompt logprobs to their sequences (finishing
    those that stop, releasing a group's held-back siblings once its prompt is computed);
    the groups that changed, by request id. Rows of aborted or finished requests and
    PLACEHOLDER rows (past a rejected draft) are skipped."""
    changed: dict[str, Group] = {}
    for request_id, (start, entries) in result.prompt_logprobs.items():
        seq = seq_of.get(request_id)
        if seq is None:  # aborted while its step was in flight
            continue
        group = groups[seq.group_id]
        # By position: a request preempted and recomputed sends its positions again.
        group.prompt_logprobs[1 + start:1 + start + len(entries)] = entries  # type: ignore[index]
        changed[group.request_id] = group
    now = time.monotonic()
    for row, (request, token, index) in enumerate(zip(result.requests, result.token_ids,
                                                      result.indices)):
        seq = seq_of.get(request.request_id)
        if seq is None or request.status.finished or token == PLACEHOLDER:
            continue  # PLACEHOLDER: a row past a rejected draft
        if request.stats.first_token_time is None:
            request.stats.first_token_time = now
        logprobs = (result.logprobs[row], result.logprob_ids[row]) \
            if result.logprobs is not None else None
        status = apply_token(seq, token, index, logprobs)
        if status is not None:
            request.stats.finish_time = now
            scheduler.finish(request, status)
        group = groups[seq.group_id]
        if group.held_back:  # the prompt is computed now: release the siblings
            scheduler.waiting.extendleft(reversed(group.held_back))
            group.held_back = []
        changed[group.request_id] = group
    return changed
