"""Structured output: constrained decoding with xgrammar (a JSON schema, a regular
expression, a list of choices or an EBNF grammar).

Each constrained sequence holds an xgrammar `GrammarMatcher`. Before a step the host
fills one bitmask row per constrained row (the tokens the grammar allows next), the
sampler applies it to the logits on the device (disallowed tokens -> -inf), and after
the step the sampled token advances the matcher. That needs the sampled token on the
host before the next step, so the engine does not overlap steps holding such a request;
other requests in the batch are unaffected (their rows are left out of the bitmask).
A constraint that allows no first token is refused when it is compiled; one that reaches
a dead end later (its mask empty) ends that request with the text so far (advance).

Before a schema is compiled, check_schema (kiln.runtime.grammar_schema) refuses the
keywords the grammar would not enforce, so an answer that completes always validates.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

from kiln.errors import RequestError
from kiln.runtime.grammar_schema import check_schema


def _xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError:
        raise RequestError("structured output needs xgrammar: pip install 'kiln[structured]'"
                           ) from None
    return xgrammar


# A server sees a new schema with every client that makes one up: the compiled grammars
# kept are the last CACHE_ENTRIES used (xgrammar's own cache: CACHE_BYTES).
CACHE_ENTRIES = 256
CACHE_BYTES = 256 * 2**20


class GrammarCompiler:
    """Compiles constraints (JSON schemas, regexes, choices, EBNF grammars) for one
    engine's tokenizer (lazily, cached per constraint: the last CACHE_ENTRIES)."""

    def __init__(self, tokenizer_dir: Path, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.tokenizer_dir = tokenizer_dir
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self._compiler: Any = None
        self._compiled: OrderedDict[tuple[str, str], Any] = OrderedDict()
        # compiles may run on a thread beside the engine's (kiln.serve.grammar_ahead)
        self._lock = threading.Lock()

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                xgr = _xgrammar()
                from transformers import PreTrainedTokenizerFast

                hf = PreTrainedTokenizerFast(
                    tokenizer_file=str(self.tokenizer_dir / "tokenizer.json"))
                info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_token_ids)
                try:
                    self._compiler = xgr.GrammarCompiler(info, cache_limit_bytes=CACHE_BYTES)
                except TypeError:  # an xgrammar without the limit (before 0.1.2x)
                    self._compiler = xgr.GrammarCompiler(info)
            return self._compiler

    def matcher(self, constraint: tuple[str, Any] | dict[str, Any] | str) -> Any:
        """A fresh matcher for `constraint`, SamplingParams.constraint's (kind, value) or a
        JSON schema; RequestError, its message starting with the kind, if it does not
        compile or (a schema) uses a keyword the grammar would not enforce (check_schema)."""
        key = _key(constraint)
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
        if compiled is None:
            compiled = self._compile(*key)
            with self._lock:
                self._compiled[key] = compiled
                while len(self._compiled) > CACHE_ENTRIES:
                    self._compiled.popitem(last=False)  # the least recently used
        return _xgrammar().GrammarMatcher(compiled)

    def cached(self, constraint: tuple[str, Any] | dict[str, Any] | str) -> bool:
        """Whether `constraint` is compiled already (or cannot be: matcher says why)."""
        try:
            key = _key(constraint)
        except RequestError:
            return True
        with self._lock:
            return key in self._compiled

    def _compile(self, kind: str, text: str) -> Any:
        if kind == "json_schema":
            try:
                check_schema(json.loads(text))
            except json.JSONDecodeError:
                pass  # xgrammar says what is wrong with it
            except RecursionError:
                raise RequestError("json_schema: the schema is nested too deeply") from None
        compiler = self._get_compiler()
        try:
            if kind == "json_schema":
                # Compact JSON: no free whitespace, so a small model cannot wander off
                # into endless spaces before the closing brace.
                compiled = compiler.compile_json_schema(text, any_whitespace=False)
            elif kind == "regex":
                compiled = compiler.compile_regex(text)
            elif kind == "choice":  # one alternative per string, as JSON-escaped literals
                compiled = compiler.compile_grammar("root ::= " + " | ".join(
                    json.dumps(c, ensure_ascii=False) for c in json.loads(text)))
            else:
                compiled = compiler.compile_grammar(text)
        except Exception as e:  # xgrammar's errors for what it cannot compile
            raise RequestError(f"{kind}: {WHAT[kind]} does not compile: "
                               f"{_library_message(e)}") from None
        # An empty language (a regex such as [^\s\S]) leaves no first token: refused
        # here, not sampled from a row of -inf logits. Where the dead end lies further on
        # ("ab[^\s\S]"), only generation finds it (advance).
        xgr = _xgrammar()
        matcher = xgr.GrammarMatcher(compiled)
        bitmask = xgr.allocate_token_bitmask(1, self.vocab_size)
        matcher.fill_next_token_bitmask(bitmask, 0)
        if not matcher.is_terminated() and not bool(bitmask.any()):
            raise RequestError(f"{kind}: {WHAT[kind]} allows no answer: no token can start "
                               "a text that matches it")
        return compiled


WHAT = {"json_schema": "the JSON schema", "regex": "the regular expression",
        "choice": "the choices", "grammar": "the grammar"}


def _key(constraint: tuple[str, Any] | dict[str, Any] | str) -> tuple[str, str]:
    """(kind, text) of a constraint: its cache key (a schema's key order matters)."""
    kind, value = constraint if isinstance(constraint, tuple) else ("json_schema", constraint)
    try:
        return kind, value if isinstance(value, str) else json.dumps(value)
    except (TypeError, ValueError, RecursionError) as e:  # from Python: not JSON data
        raise RequestError(f"{kind}: {WHAT[kind]} is not JSON data: {e}") from None


def _library_message(error: Exception) -> str:
    """The grammar library's first line without its log prefix ("[time] file.cc:line: ")."""
    line = str(error).splitlines()[0] if str(error) else type(error).__name__
    return re.sub(r"^\[[0-9:. ]+\]\s*\S+:\d+:\s*", "", line)[:300]


def grammar_bitmask(requests: list[Any], vocab_size: int, device: torch.device
                    ) -> tuple[torch.Tensor, list[int]] | None:
    """(bitmask [B, ceil(V/32)] int32 on the device, constrained rows) or None."""
    rows = [i for i, r in enumerate(requests) if r.grammar is not None]
    if not rows:
        return None
    xgr = _xgrammar()
    bitmask = xgr.allocate_token_bitmask(len(requests), vocab_size)
    for i in rows:
        if not requests[i].grammar.is_terminated():
            requests[i].grammar.fill_next_token_bitmask(bitmask, i)
            if not bool(bitmask[i].any()):  # a dead end: no token continues the text.
                bitmask[i] = -1  # Finite logits to sample from; advance refuses the token.
        else:  # complete (the request stops there): nothing but an end token again
            bitmask[i] = 0
            for t in requests[i].eos_token_ids:
                if 0 <= t < vocab_size:
                    bitmask[i, t // 32] |= (1 << t % 32) - (1 << 32 if t % 32 == 31 else 0)
    if device.type == "cuda":
        bitmask = bitmask.pin_memory().to(device, non_blocking=True)
    return bitmask, rows


def apply_grammar(logits: torch.Tensor, mask: tuple[torch.Tensor, list[int]]) -> torch.Tensor:
    """logits with the tokens each constrained row's grammar forbids set to -inf."""
    bitmask, rows = mask
    logits = logits.clone()
    _xgrammar().apply_token_bitmask_inplace(logits, bitmask, indices=rows)
    return logits


def advance(request: Any, token: int) -> bool | None:
    """Feed a sampled token to the request's matcher; True once the grammar is complete,
    None if the matcher refuses it: a dead end, where the grammar allowed no token at all
    (its mask was empty), so the request ends there (dead_end_reason)."""
    matcher = request.grammar
    if matcher.is_terminated():
        return True
    if not matcher.accept_token(token):
        return None
    return matcher.is_terminated()


def dead_end_reason(request: Any) -> str:
    """The stop_reason of a request ended at a dead end of its constraint."""
    kind = request.params.constraint[0]
    return f"{kind}: {WHAT[kind]} allows no token after the text so far"
