"""Requests coming in: what a prompt and its parameters must satisfy on this engine, and
the group of sequences (n per request) it becomes. A failure is a RequestError for that
caller only."""

from __future__ import annotations

from typing import Any

from kiln.errors import PromptTooLongError, RequestError
from kiln.runtime.output_processor import Group, Sequence
from kiln.runtime.request import INT64, Request, SamplingParams
from kiln.tokenizer import IncrementalDetokenizer, Tokenizer


def check_request(token_ids: list[int], params: SamplingParams, vocab: int, max_seq_len: int,
                  unbounded: bool = False, max_drafts: int = 0) -> int:
    """The request's max_tokens (params' or what max_seq_len leaves), or a RequestError.
    unbounded (attention sinks): no length limit; max_tokens defaults to max_seq_len.
    max_drafts: the engine's speculative k (0: no speculation), the most a request may ask."""
    if not token_ids:
        raise RequestError("the prompt is empty")
    if any(not 0 <= t < vocab for t in token_ids):
        raise RequestError(f"prompt token ids must be in [0, {vocab})")
    room = max_seq_len - len(token_ids)
    if unbounded:
        room = max(room, max_seq_len)
    if room < 1:
        raise PromptTooLongError(f"the prompt has {len(token_ids)} tokens; this engine's "
                           f"max_seq_len is {max_seq_len}, leaving no room to generate")
    max_tokens = params.max_tokens if params.max_tokens is not None else room
    if max_tokens > room and not unbounded:
        raise PromptTooLongError(f"prompt ({len(token_ids)} tokens) + max_tokens ({max_tokens}) "
                           f"exceeds max_seq_len ({max_seq_len})")
    for name, ids in (("stop_token_ids", params.stop_token_ids),
                      ("logit_bias", params.logit_bias or ()),
                      ("allowed_token_ids", params.allowed_token_ids or ())):
        for t in ids:
            if not 0 <= t < vocab:
                raise RequestError(f"{name}: token id {t} is not in the vocabulary (0 to "
                                   f"{vocab - 1})")
    for name in ("logprobs", "prompt_logprobs"):
        if (getattr(params, name) or 0) > vocab:
            raise RequestError(f"{name} must be at most the vocabulary size ({vocab})")
    if (params.num_speculative_tokens or 0) > max_drafts:
        raise RequestError(
            f"num_speculative_tokens {params.num_speculative_tokens}: this engine "
            + (f"verifies at most {max_drafts} drafts a step (its speculative_config)"
               if max_drafts else "runs without speculative decoding (start it with a "
               "speculative_config)"))
    return max_tokens


def bad_words_token_ids(tokenizer: Tokenizer | None, words: list[str]) -> list[list[int]]:
    """The token sequences that spell each bad word: as written (the start of the text, or
    after a newline) and after a space, the two ways a tokenizer may split it (as vLLM
    bans them; vLLM skips the spaced form where it has another length, kiln bans both)."""
    if not words:
        return []
    if tokenizer is None:
        raise RequestError("bad_words need the engine's tokenizer, and this engine has none")
    banned: list[list[int]] = []
    for word in words:
        for text in (word.lstrip(), " " + word.lstrip()):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if ids and ids not in banned:
                banned.append(ids)
    return banned


def new_group(request_id: str, prompt: str | list[int], token_ids: list[int],
              params: SamplingParams, max_tokens: int, seed_base: int,
              eos_token_ids: tuple[int, ...], tokenizer: Tokenizer | None,
              bad_words: list[list[int]], grammars: Any = None) -> Group:
    """The request's n sequences (sequence i samples with seed seed_base + i), each with its
    detokenizer and, for a constrained request, its grammar matcher from `grammars`."""
    sequences = []
    for index in range(params.n):
        seq_id = request_id if params.n == 1 else f"{request_id}#{index}"
        request = Request(seq_id, token_ids, params, max_tokens, eos_token_ids)
        # wrapped to int64, so distinct seeds draw distinct streams
        request.sampling_seed = (seed_base + index + INT64) % (1 << 64) - INT64
        request.bad_words_token_ids = bad_words
        if grammars is not None:
            request.grammar = grammars.matcher(params.constraint)
        detok = IncrementalDetokenizer(tokenizer, token_ids, params.skip_special_tokens) \
            if tokenizer else None
        sequences.append(Sequence(request, index, request_id, detok))
    group = Group(request_id, prompt if isinstance(prompt, str) else None, sequences)
    if params.prompt_logprobs is not None:
        group.prompt_logprobs = [None]  # the first prompt token has no logprob
        sequences[0].request.prompt_logprobs = params.prompt_logprobs
    return group
