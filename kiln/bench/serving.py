"""`kiln bench serving`: a concurrency sweep against a running OpenAI-compatible server.

For each concurrency level, `num_prompts` streaming /v1/completions requests are sent
with at most that many in flight. Per request: TTFT (send to first text), inter-token
latencies (gaps between streamed chunks), TPOT ((latency - TTFT) / (output tokens - 1)).
Per level: p50/p90/p99 of each and the request and output-token throughput.
With `--api triton` the requests go to Triton's generate_stream endpoint instead (kiln's
Triton model, or any model with Triton's generate inputs): one streamed response is
counted as one token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kiln.bench.report import check_writable, format_table, plot_lines, summarize, write_json
from kiln.checkpoint.word_tokenizer import COMMON_WORDS
from kiln.config import int_in


@dataclass(frozen=True)
class ServingBenchConfig:
    url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the server's first model
    concurrency: tuple[int, ...] = (1, 4, 16, 64)
    num_prompts: int | tuple[int, ...] = 64  # per level: one count, or one per level
    input_len: int = 128
    output_len: int = 64
    api_key: str | None = None
    seed: int = 0
    ignore_eos: bool = True  # a kiln / vLLM extension: every request makes output_len tokens
    timeout_s: float = 600.0
    api: str = "openai"  # or "triton": POST /v2/models/{model}/generate_stream


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None


def prompts_per_level(cfg: ServingBenchConfig) -> tuple[int, ...]:
    """Requests sent at each concurrency level: `num_prompts` is one count for every level,
    or one count per level (a batch-1 level needs far fewer requests than a 256-wide one)."""
    counts = cfg.num_prompts if isinstance(cfg.num_prompts, tuple) else (cfg.num_prompts,)
    if len(counts) == 1:
        return counts * len(cfg.concurrency)
    if len(counts) != len(cfg.concurrency):
        raise ValueError(f"--num-prompts has {len(counts)} counts for {len(cfg.concurrency)} "
                         "concurrency levels: give one, or one per level")
    return counts


def make_prompts(count: int, input_len: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(COMMON_WORDS, k=max(input_len, 1))) for _ in range(count)]


async def _request(client: Any, cfg: ServingBenchConfig, model: str, prompt: str
                   ) -> RequestResult:
    import httpx

    result = await _attempt(client, cfg, model, prompt)
    if isinstance(result, httpx.TransportError):
        # A reused keep-alive connection the server had just closed (an HTTP/1.1 race
        # that a busy client makes likely): the request never arrived, so send it again.
        result = await _attempt(client, cfg, model, prompt)
    if isinstance(result, Exception):
        return RequestResult(ok=False, error=f"{type(result).__name__}: {result}"[:200])
    return result


async def _attempt(client: Any, cfg: ServingBenchConfig, model: str, prompt: str
                   ) -> RequestResult | Exception:
    """One try; a transport error before any response comes back as the exception."""
    import httpx

    if cfg.api == "triton":
        path = f"/v2/models/{model}/generate_stream"
        body = {"text_input": prompt, "max_tokens": cfg.output_len, "temperature": 0.0,
                "stream": True}
    else:
        path = "/v1/completions"
        body = {"model": model, "prompt": prompt, "max_tokens": cfg.output_len,
                "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    result = RequestResult(ok=False)
    started = last = time.perf_counter()
    chunks = 0
    responded = False
    try:
        async with client.stream("POST", path, json=body) as response:
            responded = True
            if response.status_code != 200:
                await response.aread()
                result.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    result.error = str(data["error"])[:200]
                    return result
                if data.get("usage"):
                    result.prompt_tokens = data["usage"]["prompt_tokens"]
                    result.output_tokens = data["usage"]["completion_tokens"]
                if data.get("text_output") or any(c.get("text")
                                                  for c in data.get("choices", [])):
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - started
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
    except httpx.TransportError as e:
        if not responded:
            return e
        result.error = f"{type(e).__name__}: {e}"[:200]
        return result
    except Exception as e:  # a failed request is a data point, not the end of the run
        result.error = f"{type(e).__name__}: {e}"[:200]
        return result
    result.latency = time.perf_counter() - started
    if not result.output_tokens and cfg.api == "triton" and cfg.ignore_eos and chunks:
        # Triton's stream carries no token count and a response may hold several tokens
        # (a server that coalesces when its sender is behind); ignore_eos makes exactly
        # output_len of them.
        result.output_tokens = cfg.output_len
    result.output_tokens = result.output_tokens or chunks
    result.ok = chunks > 0
    if not result.ok:
        result.error = "no text was streamed"
    return result


async def _level(cfg: ServingBenchConfig, model: str, prompts: list[str],
                 concurrency: int) -> dict[str, Any]:
    """`concurrency` workers, each with a client (one connection) of its own: one pool of
    hundreds of connections costs the client O(connections) per request, which at high
    concurrency made the benchmark measure itself."""
    from tqdm.auto import tqdm

    todo = list(reversed(prompts))
    results: list[RequestResult] = []
    clients = [_client(cfg, 1) for _ in range(min(concurrency, len(prompts)))]
    with tqdm(total=len(prompts), desc=f"concurrency {concurrency}", unit="req",
              leave=False) as bar:
        async def worker(client: Any) -> None:
            async with client:
                while todo:
                    results.append(await _request(client, cfg, model, todo.pop()))
                    bar.update(1)

        started = time.perf_counter()
        await asyncio.gather(*(worker(c) for c in clients))
        duration = time.perf_counter() - started
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "concurrency": concurrency, "num_requests": len(results), "num_ok": len(ok),
        "num_failed": len(results) - len(ok), "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "mean_prompt_tokens": sum(r.prompt_tokens for r in ok) / len(ok) if ok else None,
        "mean_output_tokens": output_tokens / len(ok) if ok else None,
        "ttft_ms": summarize([r.ttft for r in ok], 1000),
        "tpot_ms": summarize(tpots, 1000),
        "itl_ms": summarize([gap for r in ok for gap in r.itl], 1000),
        "e2e_ms": summarize([r.latency for r in ok], 1000),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


def _client(cfg: ServingBenchConfig, connections: int) -> Any:
    import httpx

    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    return httpx.AsyncClient(base_url=cfg.url.rstrip("/"), headers=headers,
                             limits=httpx.Limits(max_connections=connections),
                             timeout=cfg.timeout_s)


async def run_serving_bench(cfg: ServingBenchConfig) -> dict[str, Any]:
    """Run the sweep; the result as written to JSON."""
    async with _client(cfg, 4) as client:
        model = cfg.model or ("kiln" if cfg.api == "triton" else None)
        if model is None:
            response = await client.get("/v1/models")
            response.raise_for_status()
            model = response.json()["data"][0]["id"]
        warmup = await _request(client, cfg, model, make_prompts(1, cfg.input_len, -1)[0])
        if not warmup.ok:
            raise RuntimeError(f"the warm-up request failed: {warmup.error}")
    levels = []
    for concurrency, count in zip(cfg.concurrency, prompts_per_level(cfg)):
        prompts = make_prompts(count, cfg.input_len, cfg.seed + concurrency)
        levels.append(await _level(cfg, model, prompts, concurrency))
    return {"benchmark": "serving", "model": model, "config": asdict(cfg), "levels": levels}


def result_table(result: dict[str, Any]) -> str:
    headers = ["conc", "ok", "req/s", "out tok/s"] + [
        f"{metric} p{p}" for metric in ("TTFT", "TPOT", "ITL") for p in (50, 90, 99)]
    rows = []
    for level in result["levels"]:
        row = [level["concurrency"], f"{level['num_ok']}/{level['num_requests']}",
               round(level["request_throughput"], 2), level["output_throughput"]]
        for key in ("ttft_ms", "tpot_ms", "itl_ms"):
            row += [level[key][f"p{p}"] for p in (50, 90, 99)]
        rows.append(row)
    return format_table(headers, rows) + "\n(latencies in ms)"


def plot_result(result: dict[str, Any], path: Path) -> None:
    levels = result["levels"]
    x = [level["concurrency"] for level in levels]

    def series(key: str) -> dict[str, list[float | None]]:
        return {f"p{p}": [level[key][f"p{p}"] for level in levels] for p in (50, 90, 99)}

    plot_lines(path, f"kiln bench serving: {result['model']}", "concurrency", x, [
        ("TTFT (ms)", series("ttft_ms")), ("TPOT (ms)", series("tpot_ms")),
        ("ITL (ms)", series("itl_ms")),
        ("output tokens/s", {"throughput": [level["output_throughput"] for level in levels]}),
    ])


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,4,16, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive numbers like 1,4,16")
    return values


def add_parser(modes: argparse._SubParsersAction) -> None:
    p = modes.add_parser("serving", help="concurrency sweep against a running server "
                         "(TTFT, TPOT, ITL, throughput)")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--api", choices=["openai", "triton"], default="openai",
                   help="openai: /v1/completions; triton: Triton's generate_stream "
                   "(e.g. `kiln triton-serve`; model default: kiln)")
    p.add_argument("--model", default=None, help="model name (default: the server's first)")
    p.add_argument("--concurrency", type=_int_list, default=(1, 4, 16, 64),
                   help="comma-separated levels (default: 1,4,16,64)")
    p.add_argument("--num-prompts", type=_int_list, default=(64,),
                   help="requests per level: one count, or one per level (e.g. 16,64,256)")
    p.add_argument("--input-len", type=int_in(1), default=128, help="prompt length, in words")
    p.add_argument("--output-len", type=int_in(1), default=64,
                   help="max_tokens of each request")
    p.add_argument("--api-key", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="don't send ignore_eos (for servers that reject it)")
    p.add_argument("--out", default="bench-serving.json",
                   help="result JSON; the plot goes beside it (.png)")
    p.set_defaults(func=cmd_serving)


def cmd_serving(args: argparse.Namespace) -> None:
    import httpx

    from kiln.errors import KilnError

    check_writable(args.out, "--out")
    cfg = ServingBenchConfig(url=args.url, model=args.model, concurrency=args.concurrency,
                             num_prompts=args.num_prompts, input_len=args.input_len,
                             output_len=args.output_len, api_key=args.api_key,
                             seed=args.seed, ignore_eos=args.ignore_eos, api=args.api)
    try:
        prompts_per_level(cfg)
    except ValueError as e:
        raise KilnError(str(e)) from None
    try:
        result = asyncio.run(run_serving_bench(cfg))
    except (OSError, RuntimeError, httpx.HTTPError) as e:
        raise KilnError(f"benchmark against {cfg.url} failed: {e}") from None
    out = Path(args.out)
    write_json(out, result)
    print(result_table(result))
    try:
        plot_result(result, out.with_suffix(".png"))
        print(f"kiln: wrote {out} and {out.with_suffix('.png')}")
    except ImportError:
        print(f"kiln: wrote {out} (no plot: pip install matplotlib)")
