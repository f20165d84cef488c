"""Speculative decoding on a CUDA GPU: verify-step graphs, draft-model decode graphs,
greedy identity with plain (graph) decoding."""

from __future__ import annotations

import pytest
import torch

from kiln.build import build
from kiln.config import BuildConfig
from kiln.runtime.engine import LLMEngine, RuntimeConfig
from kiln.runtime.profiling import CompileWatch
from kiln.runtime.request import SamplingParams
from tests.test_runtime import make_prompts, run_all
from tests.test_speculative import NGRAM, repeating_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU")]

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def gpu_engine(tiny_checkpoints, tmp_path_factory):
    cfg = BuildConfig(dtype="float32", max_batch_size=32, max_seq_len=512, max_num_tokens=1024)
    return build(tiny_checkpoints["llama"][0], tmp_path_factory.mktemp("gpu-spec") / "llama",
                 cfg, progress=False)


@pytest.fixture(scope="module")
def prompts():
    return repeating_prompts(8, seed=1) + make_prompts(8, seed=2)


@pytest.fixture(scope="module")
def plain(gpu_engine, prompts):
    engine = LLMEngine(gpu_engine, RuntimeConfig(device="cuda"))
    return run_all(engine, prompts, SamplingParams(max_tokens=48, **GREEDY))


def test_ngram_verify_graphs_greedy_identity(gpu_engine, prompts, plain):
    engine = LLMEngine(gpu_engine, RuntimeConfig(device="cuda", speculative_config=NGRAM))
    graphs = engine.runner.verify_graphs
    assert graphs is not None and graphs.graphs
    replays = []
    run = graphs.run
    graphs.run = lambda entries: replays.append(len(entries)) or run(entries)
    got = run_all(engine, prompts, SamplingParams(max_tokens=48, **GREEDY),
                  arrivals=[i // 4 for i in range(len(prompts))])
    assert got == plain
    assert replays
    assert engine.stats()["spec_num_accepted_tokens"] > 0
    assert engine.kv.num_used_blocks == 0


def test_draft_model_with_graphs_greedy_identity(gpu_engine, prompts, plain):
    engine = LLMEngine(gpu_engine, RuntimeConfig(device="cuda", speculative_config={
        "method": "draft_model", "model": str(gpu_engine), "num_speculative_tokens": 3}))
    assert engine.speculator.draft.runner.graphs is not None
    with CompileWatch() as watch:  # the draft's eager catch-ups were warmed up at load
        got = run_all(engine, prompts, SamplingParams(max_tokens=48, **GREEDY))
    assert got == plain
    assert watch.events == [], [(e["kernel"], e["repr"]) for e in watch.events]
    assert engine.stats()["spec_acceptance_rate"] > 0.95
    assert engine.speculator.draft.kv.num_used_blocks == 0


def test_seeded_sampling_reproducible_on_gpu(gpu_engine, prompts):
    engine = LLMEngine(gpu_engine, RuntimeConfig(device="cuda", speculative_config=NGRAM))
    params = [SamplingParams(max_tokens=32, temperature=0.7, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    assert run_all(engine, prompts, params) == run_all(
        engine, prompts, params, arrivals=list(range(len(prompts))))
