"""`kiln build | run | serve | bench | eval`: the command line."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import time
from pathlib import Path

from kiln.config import OneLineParser, add_build_arguments, build_config_from_args, limits_from_args
from kiln.errors import KilnError

SPEC_HELP = ("speculative decoding, JSON: {\"method\": \"ngram\", \"num_speculative_tokens\": 4} "
             "or {\"method\": \"draft_model\", \"model\": DRAFT, \"num_speculative_tokens\": 4}")


def cmd_build(args: argparse.Namespace) -> None:
    from kiln.build import build
    from kiln.resolve import default_model

    if args.random_weights:
        from kiln.checkpoint.random import RandomCheckpoint

        if args.source:
            raise KilnError(f"SOURCE ({args.source}) and --random-weights conflict: build "
                            "either a checkpoint or random weights of a --config preset")
        source = RandomCheckpoint(args.config or "llama-3.1-8b")
    else:
        if args.config:
            raise KilnError("--config names a preset for --random-weights only")
        source = Path(args.source) if args.source else default_model()
    started = time.perf_counter()
    out = build(source, args.output, build_config_from_args(args))
    print(f"kiln: built {out} in {time.perf_counter() - started:.1f} s")


def cmd_run(args: argparse.Namespace) -> None:
    from kiln.llm import LLM
    from kiln.runtime.request import SamplingParams

    # Checked before anything loads or builds.
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    from kiln.chat import unicode_problem

    if problem := unicode_problem(args.prompt):  # counted in what was typed, not the template
        raise KilnError(f"--prompt {problem}")
    llm = LLM(args.model, build_config_from_args(args), device=args.device,
              speculative_config=args.speculative_config, **limits_from_args(args))
    prompt = args.prompt
    if llm.tokenizer is None:
        from kiln.resolve import missing_tokenizer

        raise KilnError(missing_tokenizer(llm.engine_dir))
    if args.chat:
        prompt = llm.tokenizer.encode(llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}]), add_special_tokens=False)
    engine = llm.engine
    started = time.perf_counter()
    request_id = engine.add_request(prompt, params)
    if not args.chat:
        print(prompt, end="", flush=True)
    first_token = None
    output = None
    shown = 0
    while engine.has_unfinished():
        for output in engine.step():
            if output.request_id != request_id:
                continue
            first_token = first_token or time.perf_counter()
            print(output.text[shown:], end="", flush=True)
            shown = len(output.text)
    print()
    elapsed = time.perf_counter() - started
    if output is not None:
        n = len(output.token_ids)
        print(f"[kiln] {n} tokens in {elapsed:.2f} s ({n / elapsed:.1f} tok/s, first token "
              f"{(first_token - started) * 1000:.0f} ms, finish: {output.finish_reason}, "
              f"device: {engine.device})", file=sys.stderr)
        if engine.speculator is not None:
            from kiln.runtime.speculative import request_spec_stats

            spec = request_spec_stats(output.metrics)
            print(f"[kiln] speculative: acceptance {spec['acceptance_rate']:.2f}, "
                  f"{spec['mean_accepted_length']:.2f} tokens per verify step", file=sys.stderr)
    engine.close()  # multi-rank engines: the ranks stop together, before interpreter exit


# Each module defines add_parser(subparsers) adding its commands with set_defaults(func=...).
_PLUGIN_COMMANDS = ("kiln.serve.cli", "kiln.bench.cli", "kiln.eval", "kiln.resolve",
                    "kiln.chat")


_interrupted: list[bool] = []


def _on_ctrl_c(signum, frame) -> None:
    _interrupted.append(True)
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """The `kiln` command: its exit status. Ctrl-C ends it with 130 and no traceback,
    whenever it comes (the imports of the first second or two too). A Ctrl-C inside a C
    extension's import can come back as another error: torch swallows it while importing
    numpy, and the next `import numpy` raises ImportError. Any error after a Ctrl-C is
    that Ctrl-C, so it ends the same way."""
    _interrupted.clear()
    ours = (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if ours:
        signal.signal(signal.SIGINT, _on_ctrl_c)  # Python's own, plus a record of it
    try:
        return _main(argv)
    except KeyboardInterrupt:
        return 130
    except BaseException:
        if _interrupted:
            return 130
        raise
    finally:
        if ours and signal.getsignal(signal.SIGINT) is _on_ctrl_c:
            signal.signal(signal.SIGINT, signal.default_int_handler)


def _main(argv: list[str] | None) -> int:
    from kiln import __version__

    words = sys.argv[1:] if argv is None else argv
    if words and not {"-h", "--help", "--version"} & set(words):
        from kiln.cpu_wait import choose_openmp_wait

        choose_openmp_wait()  # before torch is imported (the subcommands below import it)

    parser = OneLineParser(prog="kiln", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kiln {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("build", help="build a HF folder or GGUF file into an engine dir")
    p.add_argument("source", nargs="?", help="HF folder or .gguf (default: SmolLM2-135M)")
    p.add_argument("-o", "--output", required=True, help="engine dir to write")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights of a real architecture (see --config), for speed tests")
    p.add_argument("--config", help="preset for --random-weights: llama-3.1-8b, llama-3.2-1b, "
                   "llama-3.2-3b, llama-3.1-70b, llama-3.1-405b, qwen2.5-7b, qwen3-8b, "
                   "mistral-7b, "
                   "mixtral-8x7b, gemma-2-9b, phi-2, falcon-7b, bloom-7b1, smollm2-135m")
    add_build_arguments(p, runtime=False)  # (--attention-sinks etc. would change nothing)
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("run", help="generate text for one prompt")
    p.add_argument("model", nargs="?", help="engine dir, HF folder or .gguf "
                   "(default: SmolLM2-135M-Instruct)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--device", default="auto")
    p.add_argument("--speculative-config", default=None, metavar="JSON", help=SPEC_HELP)
    add_build_arguments(p)
    p.set_defaults(func=cmd_run)

    # Subcommands that live with their feature register themselves here.
    for module in _PLUGIN_COMMANDS:
        try:
            importlib.import_module(module).add_parser(sub)
        except ModuleNotFoundError as e:
            if not (e.name or "").startswith("kiln"):
                raise
    if _interrupted:  # a Ctrl-C that an import swallowed (torch's of numpy) ends it here
        raise KeyboardInterrupt

    args = parser.parse_args(argv)
    if argv is None:  # the kiln command itself, not a caller in its own process
        from kiln.runtime.heap import allow_freeze

        allow_freeze()
    try:
        args.func(args)
        sys.stdout.flush()  # here, not at interpreter exit: a closed pipe is caught below
    except BrokenPipeError:
        if not _output_closed():
            raise
        return 141  # as a command killed by SIGPIPE (`kiln ... | head`): no traceback
    except KilnError as e:
        print(f"kiln: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)  # 2: a mistake in what was asked
    except ModuleNotFoundError as e:
        from kiln.extras import missing_extra_message

        message = missing_extra_message(e.name)
        if message is None:
            raise
        print(f"kiln: error: {message}", file=sys.stderr)
        return 2
    return 0


def _output_closed() -> bool:
    """Whether stdout or stderr is a pipe whose reader is gone (`kiln cache list | head
    -1`); such a stream is pointed at /dev/null, so that the interpreter's last flush of
    it does not fail too. A broken pipe elsewhere (a socket, a child process) is an error."""
    import os
    import select

    closed = False
    for stream in (sys.stdout, sys.stderr):
        try:
            fd = stream.fileno()
            poll = select.poll()
            poll.register(fd, select.POLLOUT)
            if any(events & select.POLLERR for _, events in poll.poll(0)):
                os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
                closed = True
        except (AttributeError, OSError, ValueError):  # no fd (captured), no poll (Windows)
            continue
    return closed


if __name__ == "__main__":
    sys.exit(main())
