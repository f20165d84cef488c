"""Tensor-parallel layers over real torch.distributed process groups (gloo on the CPU):
a tp=2 engine's two ranks together give the single-rank engine's logits."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from kiln.build import build
from kiln.config import BuildConfig
from kiln.distributed.launch import free_port

TOKENS = list(range(3, 40))
CFG = dict(dtype="float32", max_seq_len=128)


def _logits(runner, kv, request, num_new: int) -> torch.Tensor:
    from kiln.runtime.scheduler import ScheduledRequest, SchedulerOutput

    assert kv.allocate(request, request.num_computed_tokens + num_new)
    out = SchedulerOutput([ScheduledRequest(request, num_new, sample=False)])
    logits = runner.forward_logits(out)
    request.num_computed_tokens += num_new
    return logits


def _split_ranks(rank: int, world: int, tp: int, port: int, engines: dict[str, str],
                 result: str) -> None:
    """One rank of a gloo group of `world` (stages of `tp` ranks) running every engine of
    `engines` (name -> dir) in turn; rank 0 saves {name: {"prefill", "decode"}}: the
    logits of all prompt tokens but the last, then of one token through the KV cache."""
    import torch.distributed as dist

    from kiln.build import load_engine_config
    from kiln.distributed import Mapping
    from kiln.distributed.comm import set_tp_group
    from kiln.runtime.kv_cache import KVCacheManager
    from kiln.runtime.model_runner import ModelRunner
    from kiln.runtime.request import Request, SamplingParams

    torch.set_num_threads(1)  # up to 8 ranks on this machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        group = dist.group.WORLD
        if tp < world:  # every rank creates every stage's group, in the same order
            for start in range(0, world, tp):
                made = dist.new_group(list(range(start, start + tp)))
                group = made if start <= rank < start + tp else group
        set_tp_group(group)
        out = {}
        for name, engine_dir in engines.items():
            cfg = load_engine_config(engine_dir)
            runner = ModelRunner(Path(engine_dir), cfg, torch.device("cpu"),
                                 Mapping(world, rank, tp, world // tp))
            runner.allocate_kv_cache(16)
            kv = KVCacheManager(16, cfg.build.block_size)
            request = Request("r", TOKENS, SamplingParams(max_tokens=1), 1)
            prefill = _logits(runner, kv, request, len(TOKENS) - 1)
            decode = _logits(runner, kv, request, 1)
            out[name] = {"prefill": prefill, "decode": decode}
            dist.barrier()
        if rank == 0:
            torch.save(out, result)
        dist.barrier()  # nobody leaves while a peer may still talk to it
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown: gloo's threads may abort in it


def _run_split(engine: Path, tp: int, result: Path) -> dict:
    """The prefill and decode logits of a tp-rank engine, from tp processes."""
    mp.start_processes(_split_ranks, args=(tp, tp, free_port(), {"e": str(engine)},
                                           str(result)),
                       nprocs=tp, join=True, start_method="spawn")
    return torch.load(result)["e"]


# bloom: ALiBi slopes of each rank's heads; falcon-new: grouped fused QKV, biases;
# falcon: multi-query, its one KV head replicated on both ranks;
# gpt2: learned positions, LM head tied; phi: LM head bias, partial rotary; qwen2-moe:
# experts and the shared expert split along their intermediate size.
@pytest.mark.parametrize("arch", ["llama", "qwen2", "bloom", "falcon-new", "falcon", "gpt2",
                                  "phi", "qwen2-moe"])
def test_tp2_matches_single_rank(arch, tiny_checkpoints, tiny_engines, tmp_path):
    from kiln.eval import sequence_logits
    from kiln.runtime.engine import LLMEngine, RuntimeConfig

    folder, _ = tiny_checkpoints[arch]
    engine_tp2 = build(folder, tmp_path / "tp2", BuildConfig(**CFG, tp_size=2), progress=False)
    got = _run_split(engine_tp2, 2, tmp_path / "logits.pt")
    single = LLMEngine(build(folder, tmp_path / "tp1", BuildConfig(**CFG), progress=False),
                       RuntimeConfig(device="cpu"))
    want = sequence_logits(single, TOKENS)
    assert (got["prefill"] - want[:-1]).abs().max() < 1e-4
    assert (got["decode"][0] - want[-1]).abs().max() < 1e-4


def test_tp2_engine_generates_the_single_rank_tokens(tiny_checkpoints, tmp_path):
    """The whole engine over 2 ranks (worker process + this one): same greedy tokens."""
    from kiln import LLM, SamplingParams

    folder, _ = tiny_checkpoints["llama"]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = [TOKENS, [5, 6, 7], list(range(60, 100))]
    want = [o.token_ids for o in LLM(build(folder, tmp_path / "tp1", BuildConfig(**CFG),
                                           progress=False), device="cpu").generate(prompts, params)]
    threads = torch.get_num_threads()
    llm = LLM(build(folder, tmp_path / "tp2", BuildConfig(**CFG, tp_size=2), progress=False),
              device="cpu")
    try:
        assert [o.token_ids for o in llm.generate(prompts, params)] == want
        # the two ranks split this machine's cores (a thread per core each ran 5.4x slower)
        from kiln.distributed.launch import cpu_threads_per_rank
        assert torch.get_num_threads() == (cpu_threads_per_rank(2) or threads)
    finally:
        llm.engine.close()
    assert torch.get_num_threads() == threads  # this process's own again


def test_cpu_ranks_split_the_cores(monkeypatch):
    from kiln.distributed.launch import cpu_threads_per_rank

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert [cpu_threads_per_rank(n) for n in (1, 2, 3, 32)] == [16, 8, 5, 1]
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert cpu_threads_per_rank(2) is None  # the user's setting stands


@pytest.mark.parametrize("arch,kv,head", [
    ("llama", "auto", ""), ("llama", "fp8", ""), ("falcon", "fp8", ""),
    ("qwen2-moe", "auto", ""), ("qwen2", "auto", "auto")])
def test_tp2_fp8_engine(arch, kv, head, tiny_checkpoints, tmp_path):
    """FP8 engines shard like float ones. Row-parallel ranks scale their own slice (per-row
    weight scales and per-token input scales over the slice, as vLLM does), so TP2 is
    another FP8 rounding of the same model than TP1: as close to the float model as TP1.
    (falcon: its one KV head and its KV scale replicated on both ranks; qwen2-moe: FP8
    experts split along their intermediate size with their per-row scales, and the
    shared expert; qwen2 with --quantize-lm-head: the e4m3 head, tied to the float
    embedding in the checkpoint, split over the vocabulary.)"""
    from kiln.eval import sequence_logits
    from kiln.runtime.engine import LLMEngine, RuntimeConfig

    folder, _ = tiny_checkpoints[arch]
    fp8 = dict(quantization="fp8", kv_cache_dtype=kv, quantize_lm_head=head)
    engine_tp2 = build(folder, tmp_path / "tp2", BuildConfig(**CFG, tp_size=2, **fp8),
                       progress=False)
    got = _run_split(engine_tp2, 2, tmp_path / "logits.pt")["prefill"]
    if head:  # each rank stores its half of the vocabulary's rows, in e4m3
        from safetensors.torch import load_file

        for rank in range(2):
            weight = load_file(str(engine_tp2 / f"rank{rank}.safetensors"))["lm_head.weight"]
            assert weight.dtype == torch.float8_e4m3fn and weight.shape[0] == 256 // 2

    def single(name: str, **options) -> torch.Tensor:
        engine = LLMEngine(build(folder, tmp_path / name, BuildConfig(**CFG, **options),
                                 progress=False), RuntimeConfig(device="cpu"))
        return sequence_logits(engine, TOKENS)[:-1]

    plain, tp1 = single("float"), single("tp1", **fp8)
    tp1_error, tp2_error = (tp1 - plain).abs().mean(), (got - plain).abs().mean()
    assert tp1_error > 0.01 and tp2_error > 0.01  # both really are FP8
    assert tp2_error < 2 * tp1_error, (tp2_error, tp1_error)


def test_tp2_quantized_lm_head(tiny_checkpoints, tmp_path):
    """int4 in groups of 32 (whole groups in each rank's slice of K: the single rank's
    rounding) with the LM head quantized too (qwen2's is tied to the embedding, which
    stays float): the two ranks' halves of the vocabulary give the single rank's logits."""
    from kiln.eval import sequence_logits
    from kiln.runtime.engine import LLMEngine, RuntimeConfig

    folder, _ = tiny_checkpoints["qwen2"]
    q = dict(quantization="int4_wo", group_size=32, quantize_lm_head="auto")
    got = _run_split(build(folder, tmp_path / "tp2", BuildConfig(**CFG, tp_size=2, **q),
                           progress=False), 2, tmp_path / "logits.pt")
    single = LLMEngine(build(folder, tmp_path / "tp1", BuildConfig(**CFG, **q), progress=False),
                       RuntimeConfig(device="cpu"))
    assert single.runner.model.lm_head.method.name == "int4_wo"
    want = sequence_logits(single, TOKENS)
    assert (got["prefill"] - want[:-1]).abs().max() < 1e-4
    assert (got["decode"][0] - want[-1]).abs().max() < 1e-4


@pytest.mark.parametrize("tp", [4, 8])
def test_tp4_and_tp8_match_single_rank(tp, tmp_path):
    """4 and 8 gloo ranks (what the 4- and 8-GPU machines run over NCCL) on a tiny Llama
    of 8 query heads and 2 KV heads (each KV head replicated on tp / 2 ranks): the same
    logits as one rank, and the same greedy token at every position."""
    import transformers

    from kiln.eval import sequence_logits
    from kiln.runtime.engine import LLMEngine, RuntimeConfig
    from tests.conftest import TINY

    config = transformers.LlamaConfig(**{**TINY, "num_attention_heads": 8,
                                         "num_key_value_heads": 2})
    torch.manual_seed(3)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(tmp_path / "hf")
    engine = build(tmp_path / "hf", tmp_path / f"tp{tp}", BuildConfig(**CFG, tp_size=tp),
                   progress=False)
    got = _run_split(engine, tp, tmp_path / "logits.pt")
    single = LLMEngine(build(tmp_path / "hf", tmp_path / "tp1", BuildConfig(**CFG),
                             progress=False), RuntimeConfig(device="cpu"))
    want = sequence_logits(single, TOKENS)
    assert (got["prefill"] - want[:-1]).abs().max() < 1e-4
    assert (got["decode"][0] - want[-1]).abs().max() < 1e-4
    assert torch.equal(got["prefill"].argmax(-1), want[:-1].argmax(-1))


def test_mapping_grid_of_two_stages_of_two():
    from kiln.distributed import Mapping

    grid = [Mapping(4, rank, tp_size=2, pp_size=2) for rank in range(4)]
    assert [(m.pp_rank, m.tp_rank) for m in grid] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [m.prev_pp_rank for m in grid] == [None, None, 0, 1]
    assert [m.next_pp_rank for m in grid] == [2, 3, None, None]
    assert grid[3].tp_group_ranks() == [2, 3]
    assert [list(m.pp_layers(5)) for m in grid[::2]] == [[0, 1, 2], [3, 4]]
