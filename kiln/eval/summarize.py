"""`kiln eval summarize`: summaries of a JSONL file's articles, scored with ROUGE against the
references and, with `--compare-hf`, against transformers on the same prompts and weights."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import KilnError

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
ARTICLE_KEYS = ("article", "document", "text")
REFERENCE_KEYS = ("summary", "reference", "highlights")
INSTRUCTION = "Summarize the following text in a few sentences.\n\n"


@dataclass(frozen=True)
class Sample:
    article: str
    reference: str | None


def load_samples(path: str | Path, max_samples: int | None = None) -> list[Sample]:
    """One Sample per JSONL line: {"article": ..., "summary": ...} (the summary optional;
    "document"/"text" and "reference"/"highlights" are read too). Errors name the line."""
    from kiln.eval import check_file

    if max_samples is not None and max_samples < 1:
        raise KilnError(f"--max-samples must be at least 1, got {max_samples}")
    path = check_file(path)
    samples = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig")
            except UnicodeDecodeError as e:
                raise KilnError(f"{path}:{number}: not UTF-8 text ({e.reason} at byte "
                                f"{e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise KilnError(f"{path}:{number}: not a JSON object ({e.msg})") from None
            if not isinstance(row, dict):
                raise KilnError(f"{path}:{number}: not a JSON object")
            article = next((row[k] for k in ARTICLE_KEYS if k in row), None)
            if not isinstance(article, str) or not article.strip():
                raise KilnError(f"{path}:{number}: no article (a non-empty string under one of "
                                f"{', '.join(ARTICLE_KEYS)})")
            reference = next((row[k] for k in REFERENCE_KEYS if k in row), None)
            if reference is not None and not isinstance(reference, str):
                raise KilnError(f"{path}:{number}: the reference summary is not a string")
            samples.append(Sample(article, reference))
            if max_samples is not None and len(samples) >= max_samples:
                break
    if not samples:
        raise KilnError(f"{path} holds no samples")
    return samples


def build_prompts(tokenizer, articles: list[str], room: int) -> list[list[int]]:
    """Token ids of each summarization prompt: the chat template when the model has one,
    else a plain "Summarize:" prompt. Articles are cut (by tokens) to fit in `room`."""
    chat = bool(tokenizer.chat_template)

    def render(article: str) -> list[int]:
        if chat:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": INSTRUCTION + article}])
            return tokenizer.encode(text, add_special_tokens=False)
        return tokenizer.encode(f"{article}\n\nSummarize:")

    prompts = []
    for article in articles:
        ids = render(article)
        if len(ids) > room:  # cut the article, keep the instruction and the template
            article_ids = tokenizer.encode(article, add_special_tokens=False)
            keep = max(1, len(article_ids) - (len(ids) - room))
            ids = render(tokenizer.decode(article_ids[:keep]))[:room]
        prompts.append(ids)
    return prompts


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE F1 (rouge-score, stemmed) of each type; identical texts score 1."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        if prediction.strip() == reference.strip():
            scores = dict.fromkeys(ROUGE_TYPES, 1.0)
        else:
            # rougeLsum splits summaries into sentences at newlines
            scores = {k: v.fmeasure for k, v in scorer.score(reference, prediction).items()}
        for k in ROUGE_TYPES:
            totals[k] += scores[k]
    return {k: v / max(len(predictions), 1) for k, v in totals.items()}


def kiln_summaries(llm, prompts: list[list[int]], max_tokens: int,
                   progress: bool = True) -> list[list[int]]:
    """Greedy summaries (token ids) of all prompts in one batched generate."""
    from kiln.runtime.request import SamplingParams

    outputs = llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0),
                           use_tqdm=progress)
    return [out.token_ids for out in outputs]


def hf_summaries(source: str, engine, prompts: list[list[int]], max_tokens: int,
                 progress: bool = True) -> list[list[int]]:
    """Greedy summaries by transformers on the same prompt ids, one prompt at a time (no
    padding, so float32 runs give the same tokens), in the engine's dtype and device."""
    import torch
    from tqdm.auto import tqdm

    model = load_hf_model(source, getattr(torch, engine.config.build.dtype)).to(engine.device)
    eos = sorted(engine.eos_token_ids) or None
    summaries = []
    with torch.inference_mode():
        for ids in tqdm(prompts, desc="transformers", unit="req", disable=not progress):
            out = model.generate(torch.tensor([ids], device=engine.device),
                                 max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos,
                                 pad_token_id=eos[0] if eos else 0)[0, len(ids):].tolist()
            if eos:  # stop at the first EOS the way kiln does, keeping it
                cut = next((i for i, t in enumerate(out) if t in eos), None)
                out = out if cut is None else out[:cut + 1]
            summaries.append(out)
    return summaries


def load_hf_model(source: str, dtype):
    """transformers' model for a HF folder or a .gguf file (dequantized by transformers)."""
    import transformers

    path = Path(source).expanduser()
    if not path.exists():
        raise KilnError(f"--compare-hf: {path} does not exist (a HF folder or a .gguf file)")
    if path.suffix.lower() == ".gguf":
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval()


def hf_source_vocab(source: str) -> int:
    """The vocabulary size of --compare-hf's model (a HF folder or a .gguf), read before
    anything runs; a KilnError where it is something else (a built engine, any file)."""
    from kiln.build.engine_dir import is_engine_dir, load_engine_config
    from kiln.checkpoint import open_checkpoint

    path = Path(source).expanduser()
    if is_engine_dir(path):
        built_from = load_engine_config(path).source.get("path")
        raise KilnError(f"--compare-hf: {path} is a kiln engine; transformers needs the HF "
                        "folder or .gguf it was built from" +
                        (f" ({built_from})" if built_from else ""))
    try:
        return open_checkpoint(path).config.vocab_size
    except KilnError as e:
        raise KilnError(f"--compare-hf: {e}") from None


def evaluate(llm, samples: list[Sample], max_tokens: int, compare_hf: str | None = None,
             progress: bool = True) -> dict[str, Any]:
    """Summaries of every sample and their ROUGE scores (see the module docstring)."""
    engine = llm.engine
    if engine.tokenizer is None:
        from kiln.resolve import missing_tokenizer

        raise KilnError(missing_tokenizer(engine.engine_dir))
    room = engine.max_seq_len - max_tokens
    if room < 16:
        raise KilnError(f"--max-tokens {max_tokens} leaves no room for an article in this "
                        f"engine's max_seq_len ({engine.max_seq_len})")
    prompts = build_prompts(engine.tokenizer, [s.article for s in samples], room)
    decode = engine.tokenizer.decode
    kiln_text = [decode(t).strip() for t in kiln_summaries(llm, prompts, max_tokens, progress)]
    result: dict[str, Any] = {
        "num_samples": len(samples), "max_tokens": max_tokens,
        "prompt": "chat template" if engine.tokenizer.chat_template else "plain",
        "engine": {"dtype": engine.config.build.dtype,
                   "quantization": engine.config.build.quantization,
                   "kv_cache_dtype": engine.config.build.kv_cache_dtype},
        "rouge": {},
        "samples": [{"reference": s.reference, "kiln": k} for s, k in zip(samples, kiln_text)],
    }
    with_refs = [i for i, s in enumerate(samples) if s.reference is not None]
    if with_refs:
        refs = [samples[i].reference or "" for i in with_refs]
        result["num_references"] = len(with_refs)
        result["rouge"]["kiln_vs_reference"] = rouge([kiln_text[i] for i in with_refs], refs)
    if compare_hf:
        hf_ids = hf_summaries(compare_hf, engine, prompts, max_tokens, progress)
        hf_text = [decode(t).strip() for t in hf_ids]
        for sample, text in zip(result["samples"], hf_text):
            sample["transformers"] = text
        if with_refs:
            result["rouge"]["transformers_vs_reference"] = rouge(
                [hf_text[i] for i in with_refs], refs)
        result["rouge"]["kiln_vs_transformers"] = rouge(kiln_text, hf_text)
    return result


def check_threshold(threshold: float | None, samples: list[Sample],
                    compare_hf: str | None) -> None:
    """--rouge-threshold: a ROUGE score in [0, 1], with something to score against (see
    gate_score), checked before any generation."""
    if threshold is None:
        return
    if not 0 <= threshold <= 1:  # (NaN too)
        raise KilnError(f"--rouge-threshold must be in [0, 1] (ROUGE-L is an F1 score), got "
                        f"{threshold}")
    if not compare_hf and all(s.reference is None for s in samples):
        raise KilnError("--rouge-threshold needs reference summaries in the data (no line "
                        "has one) or --compare-hf")


def gate_score(result: dict[str, Any]) -> tuple[str, float]:
    """The score --rouge-threshold applies to: kiln's ROUGE-L against the references, or
    against transformers when no line has a reference."""
    for key in ("kiln_vs_reference", "kiln_vs_transformers"):
        if key in result["rouge"]:
            return key, result["rouge"][key]["rougeL"]
    raise KilnError("--rouge-threshold needs reference summaries in the data or --compare-hf")


def print_report(result: dict[str, Any]) -> None:
    print(f"\nsummarize: {result['num_samples']} samples, {result['max_tokens']} tokens max, "
          f"{result['prompt']} prompt; ROUGE F1")
    print(f"{'':<28}" + "".join(f"{k:>11}" for k in ROUGE_TYPES))
    for name, scores in result["rouge"].items():
        print(f"{name.replace('_', ' '):<28}" + "".join(f"{scores[k]:>11.4f}" for k in ROUGE_TYPES))


def add_parser(modes: argparse._SubParsersAction) -> None:
    from kiln.config import add_build_arguments

    p = modes.add_parser("summarize", help="ROUGE of greedy summaries of a JSONL file")
    p.add_argument("model", nargs="?", help="engine dir, HF folder or .gguf (default model)")
    p.add_argument("--data", required=True, metavar="FILE.jsonl",
                   help='one {"article": ..., "summary": ...} per line (summary optional)')
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=128, help="summary length limit")
    p.add_argument("--compare-hf", metavar="HF_SOURCE", default=None,
                   help="also run transformers on this HF folder or .gguf (same weights)")
    p.add_argument("--rouge-threshold", type=float, default=None, metavar="X",
                   help="exit non-zero when kiln's ROUGE-L (vs the references, else vs "
                   "transformers) is below X")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--device", default="auto")
    add_build_arguments(p)
    p.set_defaults(func=_cmd_summarize)


def _cmd_summarize(args: argparse.Namespace) -> None:
    from kiln.bench.report import check_writable, write_json
    from kiln.eval import open_llm

    if args.max_tokens < 1:
        raise KilnError("--max-tokens must be at least 1")
    samples = load_samples(args.data, args.max_samples)
    check_threshold(args.rouge_threshold, samples, args.compare_hf)
    check_writable(args.out, "--out")
    hf_vocab = hf_source_vocab(args.compare_hf) if args.compare_hf else None
    llm = open_llm(args)
    vocab = llm.engine.config.model.vocab_size
    if hf_vocab is not None and hf_vocab != vocab:
        raise KilnError(f"--compare-hf: {args.compare_hf} has {hf_vocab} tokens in its "
                        f"vocabulary, the model {vocab}: name the same model's HF folder or "
                        ".gguf")
    result = evaluate(llm, samples, args.max_tokens, args.compare_hf)
    print_report(result)
    if args.rouge_threshold is not None:
        key, score = gate_score(result)
        result["gate"] = {"score": key + ".rougeL", "value": score,
                          "threshold": args.rouge_threshold,
                          "passed": score >= args.rouge_threshold}
    if args.out:
        write_json(Path(args.out), result)
        print(f"kiln: wrote {args.out}")
    gate = result.get("gate")
    if gate and not gate["passed"]:
        raise KilnError(f"ROUGE-L {gate['value']:.4f} ({gate['score']}) is below the "
                        f"threshold {gate['threshold']}")
