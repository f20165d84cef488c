"""Model-quality evaluation on the engine: full-sequence logits and perplexity."""

from __future__ import annotations

import math

import torch

from kiln.runtime.engine import LLMEngine


def sequence_logits(engine: LLMEngine, token_ids: list[int]) -> torch.Tensor:
    """Logits [len, vocab] of every position of one sequence, computed in one step."""
    return engine.sequence_logits(token_ids)


def perplexity(engine: LLMEngine, token_ids: list[int], window: int = 1024) -> float:
    """exp(mean NLL) over non-overlapping windows (each window starts fresh)."""
    nll, count = 0.0, 0
    for start in range(0, len(token_ids) - 1, window):
        chunk = token_ids[start:start + window]
        if len(chunk) < 2:
            break
        logits = sequence_logits(engine, chunk)
        targets = torch.tensor(chunk[1:])
        nll += torch.nn.functional.cross_entropy(logits[:-1], targets, reduction="sum").item()
        count += len(chunk) - 1
    return math.exp(nll / count)


def add_parser(sub) -> None:
    """`kiln eval perplexity [MODEL] --file TEXT`: perplexity of a text file."""
    p = sub.add_parser("eval", help="model quality: perplexity of a text file")
    modes = p.add_subparsers(dest="mode", required=True, metavar="MODE")
    ppl = modes.add_parser("perplexity", help="exp(mean NLL) over non-overlapping windows")
    ppl.add_argument("model", nargs="?", help="engine dir, HF folder or .gguf (default model)")
    ppl.add_argument("--file", required=True, help="a UTF-8 text file")
    ppl.add_argument("--window", type=int, default=1024)
    ppl.add_argument("--max-tokens", type=int, default=None, help="only the first N tokens")
    ppl.add_argument("--device", default="auto")
    ppl.set_defaults(func=_cmd_perplexity)


def _cmd_perplexity(args) -> None:
    from pathlib import Path

    from kiln.config import BuildConfig
    from kiln.errors import KilnError
    from kiln.resolve import resolve_engine
    from kiln.runtime.engine import RuntimeConfig

    path = Path(args.file)
    if not path.is_file():
        raise KilnError(f"{path} does not exist")
    engine_dir = resolve_engine(args.model, BuildConfig(max_seq_len=max(args.window, 256)))
    engine = LLMEngine(engine_dir, RuntimeConfig(device=args.device))
    if engine.tokenizer is None:
        raise KilnError("this engine has no tokenizer, so it cannot read text")
    ids = engine.tokenizer.encode(path.read_text(encoding="utf-8"))[: args.max_tokens]
    if len(ids) < 2:
        raise KilnError(f"{path} holds fewer than 2 tokens")
    window = min(args.window, engine.max_seq_len)
    print(f"perplexity {perplexity(engine, ids, window):.4f} over {len(ids)} tokens "
          f"(window {window})")
