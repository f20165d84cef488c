"""`kiln chat [MODEL]`: an interactive chat in the terminal, with the model's chat template.

Answers stream as they are generated; the conversation is kept across turns (the oldest
turns are dropped when it outgrows the context). /reset starts over, /exit or Ctrl-D
leaves, Ctrl-C stops the current answer and keeps the chat going. A message that cannot
be sent (bytes that are not UTF-8) is refused with a line saying why, and the chat goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import signal
import sys

from kiln.config import add_build_arguments, build_config_from_args, limits_from_args
from kiln.errors import KilnError, RequestError

PROMPT = "you> "
HELP = "/reset clears the conversation, /exit (or Ctrl-D) leaves, Ctrl-C stops an answer"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model in the terminal")
    p.add_argument("model", nargs="?", help="engine dir, HF folder or .gguf "
                   "(default: SmolLM2-135M-Instruct)")
    p.add_argument("--system", default=None, help="a system message to start with")
    p.add_argument("--max-tokens", type=int, default=512, help="per answer")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--device", default="auto")
    add_build_arguments(p)
    p.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> None:
    from kiln.llm import LLM
    from kiln.runtime.request import SamplingParams

    # Checked before the model loads: a bad option fails now, not at the first message.
    asked = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                           top_p=args.top_p)
    if args.system is not None and (problem := unicode_problem(args.system)):
        raise KilnError(f"--system {problem}")
    llm = LLM(args.model, build_config_from_args(args), device=args.device,
              **limits_from_args(args))
    tokenizer = llm.tokenizer
    if tokenizer is None:
        from kiln.resolve import missing_tokenizer

        raise KilnError(missing_tokenizer(llm.engine_dir))
    if not tokenizer.chat_template:
        raise KilnError("this model has no chat template; use `kiln run --prompt ...`")
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    if isinstance(sys.stdin, io.TextIOWrapper):  # a line that is not UTF-8 arrives whole
        sys.stdin.reconfigure(errors="surrogateescape")
    print(f"kiln chat ({llm.engine_dir.name}). {HELP}", flush=True)
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        problem = unicode_problem(line)
        if problem is not None:
            print(f"(not sent: that message {problem})", flush=True)
            continue
        text = line.strip()
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = list(start)
            print("(conversation cleared)", flush=True)
            continue
        if not text:
            continue
        if text.startswith("/"):
            print(f"(unknown command {text.split()[0]}; {HELP})", flush=True)
            continue
        before = list(history)  # _fit drops old turns: kept if this message is refused
        history.append({"role": "user", "content": line})
        try:
            prompt = _fit(llm, history, start, args.max_tokens)
            if prompt is None:
                raise RequestError("that message alone is longer than the model's context")
            room = llm.engine.max_seq_len - len(prompt)
            params = dataclasses.replace(asked, max_tokens=min(args.max_tokens, room))
            answer, stopped = _answer(llm.engine, prompt, params)
        except RequestError as e:  # this message only: the conversation goes on without it
            history = before
            print(f"({e})", flush=True)
            continue
        print(" [stopped]" if stopped else "", flush=True)
        history.append({"role": "assistant", "content": answer})


def unicode_problem(text: str) -> str | None:
    """What makes a line typed or an argument (bytes that are not UTF-8 arrive as lone
    surrogates) not valid Unicode, counted in its characters; None when it is valid."""
    from kiln.tokenizer import lone_surrogate

    at = lone_surrogate(text)
    if at is None:
        return None
    code = ord(text[at])
    what = f"byte 0x{code - 0xDC00:02X}" if 0xDC80 <= code <= 0xDCFF else \
        f"a lone surrogate U+{code:04X}"
    after = f" (after {text[max(0, at - 20):at]!r})" if at else ""
    return f"is not UTF-8 text: {what} at character {at + 1}{after}"


def _answer(engine, prompt: list[int], params) -> tuple[str, bool]:
    """Stream one answer to stdout. Ctrl-C is taken between engine steps (never inside
    one), then the request is aborted and its KV blocks freed."""
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    request_id = engine.add_request(prompt, params)
    shown = ""
    try:
        while request_id in engine.groups and not interrupted:
            for output in engine.step():
                if output.request_id == request_id:
                    text = output.outputs[0].text
                    sys.stdout.write(text[len(shown):])
                    sys.stdout.flush()
                    shown = text
    finally:
        engine.abort(request_id)
        signal.signal(signal.SIGINT, previous)
    return shown, bool(interrupted)


def _fit(llm, history: list[dict], start: list[dict], max_tokens: int) -> list[int] | None:
    """The templated conversation as token ids, dropping the oldest turns (not the system
    message) until it leaves room for an answer; None if even the last message alone
    does not fit."""
    tokenizer = llm.tokenizer
    limit = llm.engine.max_seq_len - min(max_tokens, 64)
    while True:
        ids = tokenizer.encode(tokenizer.apply_chat_template(history),
                               add_special_tokens=False)
        if len(ids) <= limit:
            return ids
        if len(history) <= len(start) + 1:
            return None
        del history[len(start):len(start) + 2]  # the oldest user/assistant turn
