"""The engine's warm-up steps (kiln.runtime.warmup), run on the CPU: every step goes through
the model (prompts and decode rows in both orders, the wide prefill), K/V only into the
scratch block. On a GPU they compile the kernels (tests/test_gpu_engine.py checks that
steps after load compile nothing)."""

from __future__ import annotations

import torch

from kiln.runtime import warmup
from kiln.runtime.engine import LLMEngine, RuntimeConfig
from kiln.runtime.request import SamplingParams
from tests.test_runtime import make_prompts, run_all


def test_steps_cover_every_launch(tiny_engines, monkeypatch):
    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu"))
    model = engine.runner.model
    steps = warmup.warmup_steps(model, 512, 256, torch.device("cpu"))
    firsts = [seqs[0][0] for seqs in steps]
    assert firsts[:6] == [2, 8, 16, 32, 64, 128] and all(s[1][0] == 1 for s in steps[:6])
    assert steps[6] == [(1, 256), (255, 255)]  # a decode row first
    attn = model.attention_layers()[0]
    wide = steps[7]  # 128-row tiles x prompts x KV heads >= two programs an SM (8 here)
    tiles = -(-255 * (attn.num_heads // attn.num_kv_heads) // 128)
    assert len(wide) * tiles * attn.num_kv_heads >= 16 and set(wide) == {(255, 255)}
    monkeypatch.setattr(warmup, "num_sms", lambda device: 10_000)  # capped by the budget
    assert len(warmup.wide_prefill_step(model, 255, 512, torch.device("cpu"))) == 2


def test_warm_up_runs_and_leaves_the_cache_to_requests(tiny_engines):
    """The steps run through the model on the CPU, writing only the scratch block: the
    engine then gives the tokens of one that never warmed up."""
    prompts = make_prompts(6, seed=4)
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    want = run_all(LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu")), prompts,
                   params)
    engine = LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu"))
    free = engine.kv.num_free_blocks
    assert warmup.warm_up(engine.runner, 512, engine.max_seq_len) > 0
    assert engine.kv.num_free_blocks == free
    assert run_all(engine, prompts, params) == want
