"""Attention sinks (StreamingLLM): generation past max_seq_len in constant memory, against
a reference StreamingLLM written here on the transformers model's weights."""

from __future__ import annotations

import pytest
import torch

from kiln.build import build
from kiln.config import BuildConfig
from kiln.errors import KilnError
from kiln.runtime.engine import LLMEngine, RuntimeConfig
from kiln.runtime.request import SamplingParams
from tests.test_runtime import run_all

BLOCK = 16
GREEDY = dict(temperature=0, ignore_eos=True)


class ReferenceStreamingLLM:
    """StreamingLLM on a transformers Llama, one token at a time, from first principles:
    each layer caches K before rotary and V; positions are indices in the cache; the cache
    keeps the first `sink_blocks` blocks of tokens and drops the oldest block after them
    whenever a new token would need more than sink + window + 1 blocks (kiln's block
    granularity, see kiln.runtime.streaming)."""

    def __init__(self, hf, sink_blocks: int, window_blocks: int) -> None:
        self.hf = hf
        cfg = hf.config
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.dim = cfg.hidden_size // cfg.num_attention_heads
        self.capacity = (sink_blocks + window_blocks + 1) * BLOCK
        self.sink_tokens = sink_blocks * BLOCK
        theta = getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]
        self.inv_freq = 1.0 / theta ** (torch.arange(0, self.dim, 2, dtype=torch.float32)
                                        / self.dim)
        self.cache = [([], []) for _ in hf.model.layers]  # per layer: K, V rows
        self.evicted = 0

    def _rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        freqs = torch.outer(positions.float(), self.inv_freq)
        cos = torch.cat([freqs.cos(), freqs.cos()], -1)[:, None]
        sin = torch.cat([freqs.sin(), freqs.sin()], -1)[:, None]
        x1, x2 = x.chunk(2, -1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    @torch.no_grad()
    def step(self, token: int) -> torch.Tensor:
        """Feed one token, return its next-token logits."""
        kept = len(self.cache[0][0])
        if -(-(kept + 1) // BLOCK) > self.capacity // BLOCK:  # evict the oldest window block
            for keys, values in self.cache:
                del keys[self.sink_tokens:self.sink_tokens + BLOCK]
                del values[self.sink_tokens:self.sink_tokens + BLOCK]
            self.evicted += BLOCK
            kept -= BLOCK
        model = self.hf.model
        h = model.embed_tokens(torch.tensor([token]))
        for layer, (keys, values) in zip(model.layers, self.cache):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(1, self.heads, self.dim)
            keys.append(attn.k_proj(x).view(self.kv_heads, self.dim))
            values.append(attn.v_proj(x).view(self.kv_heads, self.dim))
            n = len(keys)
            q = self._rotate(q, torch.tensor([n - 1]))[0]  # [heads, d] at its cache index
            k = self._rotate(torch.stack(keys), torch.arange(n))  # [n, kv_heads, d]
            v = torch.stack(values)
            group = self.heads // self.kv_heads
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            scores = torch.einsum("hd,nhd->hn", q, k) * self.dim ** -0.5
            o = torch.einsum("hn,nhd->hd", scores.softmax(-1), v).reshape(1, -1)
            h = h + attn.o_proj(o)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.hf.lm_head(model.norm(h))[0]

    def generate(self, prompt: list[int], n: int) -> list[int]:
        logits = None
        for t in prompt:
            logits = self.step(t)
        out = []
        for _ in range(n):
            out.append(int(logits.argmax()))
            logits = self.step(out[-1])
        return out


@pytest.fixture(scope="module")
def llama(tiny_checkpoints, tmp_path_factory):
    folder, hf = tiny_checkpoints["llama"]
    engine = build(folder, tmp_path_factory.mktemp("stream") / "llama",
                   BuildConfig(dtype="float32", max_seq_len=64, max_batch_size=8,
                               max_num_tokens=256), progress=False)
    return engine, hf


def test_reference_is_the_model_before_any_eviction(llama):
    """The reference above equals transformers while nothing is evicted (cache index =
    text position), so it is a faithful model to compare against."""
    _, hf = llama
    prompt = [5, 9, 13, 2, 77, 31, 8, 100, 4, 3, 61, 12]
    ref = ReferenceStreamingLLM(hf, 1, 2)
    got = torch.stack([ref.step(t) for t in prompt])
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0]
    assert ref.evicted == 0
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_generation_4x_max_seq_len_matches_streaming_llm(llama):
    """Sinks 4 (one block) + window 32 (two blocks) on an engine built for 64 tokens:
    three requests of different lengths generate 256-token sequences (4x max_seq_len)
    together, token for token as the reference, never holding more than 4 blocks each."""
    path, hf = llama
    engine = LLMEngine(path, RuntimeConfig(device="cpu", attention_sinks=4,
                                           attention_window=32))
    stream = engine.streaming
    assert (stream.sink_blocks, stream.window_blocks, stream.capacity_blocks) == (1, 2, 4)
    prompts = [[7, 3, 99, 150, 41], list(range(20, 50)), [200, 6] * 9]
    counts = [256 - len(p) for p in prompts]
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in counts]
    for i, (p, sp) in enumerate(zip(prompts, params)):
        engine.add_request(p, sp, request_id=str(i))
    results, most_blocks = {}, 0
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.token_ids
        most_blocks = max(most_blocks, engine.kv.num_used_blocks)
        for r in engine.scheduler.running:
            assert len(r.block_ids) <= stream.capacity_blocks
    assert most_blocks <= len(prompts) * stream.capacity_blocks
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    for i, prompt in enumerate(prompts):
        want = ReferenceStreamingLLM(hf, 1, 2).generate(prompt, counts[i])
        assert results[str(i)] == want, i


def test_sinks_without_eviction_change_nothing(llama):
    """Within max_seq_len nothing is evicted and keys rotated as read equal keys rotated
    as written: the same tokens as the plain engine, through chunked prefill (the prompt
    is longer than the window) and batching."""
    path, _ = llama
    prompts = [list(range(3, 43)), [9, 8, 7], list(range(100, 120))]
    params = SamplingParams(max_tokens=12, **GREEDY)
    plain = run_all(LLMEngine(path, RuntimeConfig(device="cpu")), prompts, params)
    sinks = LLMEngine(path, RuntimeConfig(device="cpu", attention_sinks=4))
    assert sinks.streaming.window == 64 - 2 * BLOCK  # what max_seq_len leaves
    assert run_all(sinks, prompts, params) == plain


def test_sinks_lift_the_length_limit_only_with_sinks(llama):
    path, _ = llama
    plain = LLMEngine(path, RuntimeConfig(device="cpu"))
    with pytest.raises(Exception, match="exceeds max_seq_len"):
        plain.add_request([1, 2, 3], SamplingParams(max_tokens=500))
    sinks = LLMEngine(path, RuntimeConfig(device="cpu", attention_sinks=4, attention_window=16))
    sinks.add_request([1, 2, 3], SamplingParams(max_tokens=500))


@pytest.mark.parametrize("arch, runtime, message", [
    ("gpt2", dict(attention_sinks=4), "RoPE"),
    ("phi", dict(attention_sinks=4), "partial rotary"),
    ("mistral-window", dict(attention_sinks=4), "sliding-window"),
    ("llama", dict(attention_window=16), "attention_sinks >= 1"),
    ("llama", dict(attention_sinks=4, attention_window=60), "within max_seq_len"),
])
def test_unsupported_sinks_fail_at_load_with_the_reason(arch, runtime, message, tiny_checkpoints,
                                                        tmp_path):
    folder, _ = tiny_checkpoints[arch]
    path = build(folder, tmp_path / arch, BuildConfig(dtype="float32", max_seq_len=64),
                 progress=False)
    with pytest.raises(KilnError, match=message):
        LLMEngine(path, RuntimeConfig(device="cpu", **runtime))


def test_tp2_streaming_equals_one_rank(tiny_checkpoints, tmp_path):
    """Every rank evicts the same blocks (the scheduler is replicated): a TP2 engine with
    sinks generates the one-rank engine's tokens, 3x past max_seq_len."""
    from kiln import LLM

    folder, _ = tiny_checkpoints["llama"]
    cfg = dict(dtype="float32", max_seq_len=64, max_batch_size=4)
    prompts = [[7, 3, 99, 150, 41], list(range(20, 50))]
    params = SamplingParams(max_tokens=180, **GREEDY)
    sinks = dict(device="cpu", attention_sinks=4, attention_window=32)
    want = [o.token_ids for o in LLM(build(folder, tmp_path / "tp1", BuildConfig(**cfg),
                                           progress=False), **sinks).generate(prompts, params)]
    llm = LLM(build(folder, tmp_path / "tp2", BuildConfig(**cfg, tp_size=2), progress=False),
              **sinks)
    try:
        assert [o.token_ids for o in llm.generate(prompts, params)] == want
    finally:
        llm.engine.close()


def _prompt_logprobs(path, prompt: list[int], **runtime) -> torch.Tensor:
    """Each prompt token's logprob (after the first) from one engine."""
    engine = LLMEngine(path, RuntimeConfig(device="cpu", **runtime))
    engine.add_request(prompt, SamplingParams(max_tokens=1, prompt_logprobs=0, **GREEDY), "p")
    out = None
    while engine.has_unfinished():
        out = next((o for o in engine.step() if o.finished), out)
    return torch.tensor([lp[t] for lp, t in zip(out.prompt_logprobs[1:], prompt[1:])])


def test_sinks_over_an_fp8_kv_cache(llama, tiny_checkpoints, tmp_path):
    """An FP8 cache holds the keys before rotary (the kernels rotate what they dequantize):
    over a 200-token prompt prefilled in chunks that evict (a 64-token cache), the FP8
    engine's prompt logprobs stay as close to the float-cache one's as a plain FP8 engine's
    are to a plain float engine's on a prompt that fits (at most twice as far)."""
    path, _ = llama
    folder, _ = tiny_checkpoints["llama"]
    fp8 = build(folder, tmp_path / "fp8kv", BuildConfig(dtype="float32", max_seq_len=64,
                                                         max_num_tokens=256,
                                                         kv_cache_dtype="fp8"), progress=False)
    prompt = [(i * 37 + 11) % 250 + 3 for i in range(200)]
    sinks = dict(attention_sinks=4, attention_window=32)
    streamed = (_prompt_logprobs(fp8, prompt, **sinks) -
                _prompt_logprobs(path, prompt, **sinks)).abs().mean()
    plain = (_prompt_logprobs(fp8, prompt[:60]) - _prompt_logprobs(path, prompt[:60])).abs().mean()
    assert 0 < plain and 0 < streamed <= 2 * plain, (streamed, plain)
