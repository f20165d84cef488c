"""Model-quality evaluation on the engine: perplexity of a text, ROUGE of summaries against
references and transformers, and one table across build formats (`kiln eval ...`)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from kiln.config import add_build_arguments, build_config_from_args, limits_from_args
from kiln.errors import KilnError
from kiln.runtime.engine import LLMEngine


def sequence_logits(engine: LLMEngine, token_ids: list[int]) -> torch.Tensor:
    """Logits [len, vocab] of every position of one sequence, computed in one step."""
    return engine.sequence_logits(token_ids)


def perplexity(engine: LLMEngine, token_ids: list[int], window: int = 1024) -> float:
    """exp(mean NLL) over non-overlapping windows (each window starts fresh)."""
    return scored_perplexity(engine, token_ids, window)[0]


def scored_perplexity(engine: LLMEngine, token_ids: list[int], window: int = 1024
                      ) -> tuple[float, int]:
    """(perplexity, tokens scored): each window's first token has no context to be
    scored with, nor has a last window of one token, so fewer are scored than read."""
    nll, count = 0.0, 0
    for start in range(0, len(token_ids) - 1, window):
        chunk = token_ids[start:start + window]
        if len(chunk) < 2:
            break
        logits = sequence_logits(engine, chunk)
        targets = torch.tensor(chunk[1:])
        nll += torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(nll / count), count


def check_file(path: str | Path) -> Path:
    """A file the user named, or a KilnError saying what it is instead."""
    path = Path(path)
    if path.is_dir():
        raise KilnError(f"{path} is a directory, not a file")
    if not path.exists():
        raise KilnError(f"{path} does not exist")
    return path


def read_text(path: str | Path) -> str:
    """A UTF-8 text file given by the user, or one clear KilnError."""
    path = check_file(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise KilnError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def check_perplexity_options(window: int, max_tokens: int | None,
                             max_flag: str = "--max-tokens") -> None:
    """A KilnError for a window or token limit too small to score a token after another."""
    if window < 2:
        raise KilnError(f"--window must be at least 2 (tokens scored together), got {window}")
    if max_tokens is not None and max_tokens < 2:
        raise KilnError(f"{max_flag} must be at least 2 (a token and the one after it), got "
                        f"{max_tokens}")


def text_perplexity(engine: LLMEngine, text: str, window: int,
                    max_tokens: int | None = None) -> tuple[float, int, int]:
    """(perplexity, tokens scored, window) of a text on the engine."""
    check_perplexity_options(window, max_tokens)
    if engine.tokenizer is None:
        from kiln.resolve import missing_tokenizer

        raise KilnError(missing_tokenizer(engine.engine_dir))
    ids = engine.tokenizer.encode(text)[:max_tokens]
    if len(ids) < 2:
        raise KilnError("the text holds fewer than 2 tokens")
    window = min(window, engine.max_seq_len)
    return (*scored_perplexity(engine, ids, window), window)


def add_parser(sub) -> None:
    """`kiln eval perplexity | summarize | quality`."""
    from kiln.eval import quality, summarize

    p = sub.add_parser("eval", help="model quality: perplexity, summarization ROUGE, formats")
    modes = p.add_subparsers(dest="mode", required=True, metavar="MODE")
    ppl = modes.add_parser("perplexity", help="exp(mean NLL) over non-overlapping windows")
    ppl.add_argument("model", nargs="?", help="engine dir, HF folder or .gguf (default model)")
    ppl.add_argument("--file", required=True, help="a UTF-8 text file")
    ppl.add_argument("--window", type=int, default=1024)
    ppl.add_argument("--max-tokens", type=int, default=None, help="only the first N tokens")
    ppl.add_argument("--device", default="auto")
    add_build_arguments(ppl)
    ppl.set_defaults(func=_cmd_perplexity)
    summarize.add_parser(modes)
    quality.add_parser(modes)


def open_llm(args: argparse.Namespace, **overrides):
    """The LLM the command's model and build options name (built into the cache once)."""
    from kiln.llm import LLM

    return LLM(args.model, build_config_from_args(args, **overrides), device=args.device,
               **limits_from_args(args))


def _cmd_perplexity(args: argparse.Namespace) -> None:
    check_perplexity_options(args.window, args.max_tokens)
    text = read_text(args.file)
    llm = open_llm(args)
    ppl, count, window = text_perplexity(llm.engine, text, args.window, args.max_tokens)
    print(f"perplexity {ppl:.4f} over {count} tokens scored (window {window})")
