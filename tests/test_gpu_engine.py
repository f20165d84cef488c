"""The engine on a CUDA GPU: kernels + CUDA graphs + overlap against transformers."""

from __future__ import annotations

import pytest
import torch

from kiln.build import build
from kiln.config import BuildConfig
from kiln.runtime.engine import LLMEngine, RuntimeConfig
from kiln.runtime.profiling import CompileWatch
from kiln.runtime.request import SamplingParams
from tests.conftest import ARCH_CONFIGS
from tests.test_runtime import make_prompts, run_all

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA GPU")]

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def gpu_engines(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    out = {}
    for dtype in ("float32", "bfloat16"):
        cfg = BuildConfig(dtype=dtype, max_batch_size=32, max_seq_len=512, max_num_tokens=1024)
        for arch, (folder, _) in tiny_checkpoints.items():
            out[arch, dtype] = build(folder, root / f"{arch}-{dtype}", cfg, progress=False)
    return out


def hf_greedy(model, prompt, n):
    with torch.no_grad():
        ids = torch.tensor([prompt], device="cuda")
        seq = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0,
                             eos_token_id=None)
    return seq[0, len(prompt):].tolist()


@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
def test_fp32_greedy_matches_transformers_on_gpu(arch, tiny_checkpoints, gpu_engines):
    _, hf = tiny_checkpoints[arch]
    hf = hf.to("cuda")
    engine = LLMEngine(gpu_engines[arch, "float32"], RuntimeConfig(device="cuda"))
    prompts = make_prompts(6, seed=3)
    got = run_all(engine, prompts, SamplingParams(max_tokens=24, **GREEDY))
    for i, prompt in enumerate(prompts):
        assert got[str(i)] == hf_greedy(hf, prompt, 24), (arch, i)
    hf.to("cpu")


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "bloom", "phi", "mixtral"])
def test_bf16_logits_close_to_transformers(arch, tiny_checkpoints, gpu_engines, tmp_path):
    """kiln in bf16 on the GPU is as close to the float32 model as transformers in bf16
    is to transformers in float32: within 2% (relative norm), or 1.5x transformers' own
    bf16 error where that is larger. kiln's float32 truth is its float32 engine on the CPU
    (which test_parity holds to transformers at CI's version): the GPU machine's older
    transformers computes tiny Gemma 2 (window 6) 7.9% away from it, as far from kiln on
    the CPU as on the GPU. Mixtral's router is sharpened first: on a random 4-expert
    model near-tied routes flip between any two bf16 implementations (5% apart)."""
    import copy

    from kiln.eval import sequence_logits

    folder, hf = tiny_checkpoints[arch]
    engines = {dtype: gpu_engines[arch, dtype] for dtype in ("float32", "bfloat16")}
    if arch == "mixtral":
        hf = copy.deepcopy(hf)
        experts = hf.config.num_local_experts
        with torch.no_grad():
            for name, param in hf.named_parameters():
                if name.endswith("gate.weight") and param.shape[0] == experts:
                    param.mul_(20)
        hf.save_pretrained(tmp_path / "sharp")
        for extra in folder.glob("tokenizer*"):
            (tmp_path / "sharp" / extra.name).write_bytes(extra.read_bytes())
        engines = {dtype: build(tmp_path / "sharp", tmp_path / dtype, BuildConfig(
            dtype=dtype, max_batch_size=32, max_seq_len=512, max_num_tokens=1024),
            progress=False) for dtype in engines}
    tokens = list(range(3, 200))
    with torch.no_grad():
        hf_truth = hf(torch.tensor([tokens])).logits[0].float()
        hf16 = copy.deepcopy(hf).to("cuda", torch.bfloat16)
        hf_bf16 = hf16(torch.tensor([tokens], device="cuda")).logits[0].float().cpu()
    del hf16
    truth = sequence_logits(LLMEngine(engines["float32"], RuntimeConfig(device="cpu")), tokens)
    got = sequence_logits(LLMEngine(engines["bfloat16"], RuntimeConfig(device="cuda")), tokens)

    def error(x: torch.Tensor, ref: torch.Tensor) -> float:
        return ((x - ref).norm() / ref.norm()).item()

    hf_error = error(hf_bf16, hf_truth)
    assert error(got, truth) < max(2e-2, 1.5 * hf_error), (error(got, truth), hf_error,
                                                           error(truth, hf_truth))


@pytest.mark.parametrize("graphs, overlap", [(False, False), (True, False), (True, True)])
def test_graphs_and_overlap_keep_tokens(gpu_engines, graphs, overlap):
    """Same greedy tokens eager, with CUDA graphs, and with overlap scheduling (fp32)."""
    path = gpu_engines["llama", "float32"]
    prompts = make_prompts(24, seed=5)
    arrivals = [i // 3 for i in range(24)]
    params = [SamplingParams(max_tokens=8 + i, **GREEDY) for i in range(24)]
    ref = LLMEngine(path, RuntimeConfig(device="cuda", cuda_graphs=False,
                                        overlap_scheduling=False))
    want = run_all(ref, prompts, params, arrivals)
    engine = LLMEngine(path, RuntimeConfig(device="cuda", cuda_graphs=graphs,
                                           overlap_scheduling=overlap))
    assert (engine.runner.graphs is not None) == graphs
    assert run_all(engine, prompts, params, arrivals) == want
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_decode_graph_routes_keep_tokens(gpu_engines):
    """Every batch replaying the widest bucket's graph (what a route to a faster, larger
    bucket does) gives the eager engine's tokens; the load timed every bucket."""
    path = gpu_engines["llama", "float32"]
    prompts = make_prompts(24, seed=7)
    arrivals = [i // 3 for i in range(24)]
    params = [SamplingParams(max_tokens=8 + i, **GREEDY) for i in range(24)]
    want = run_all(LLMEngine(path, RuntimeConfig(device="cuda", cuda_graphs=False)),
                   prompts, params, arrivals)
    engine = LLMEngine(path, RuntimeConfig(device="cuda"))
    graphs = engine.runner.graphs
    assert sorted(graphs.replay_ms) == graphs.buckets
    assert all(t > 0 for t in graphs.replay_ms.values())
    widest = graphs.buckets[-1]
    replayed = []

    class Watched:
        def __init__(self, graph):
            self.graph = graph

        def replay(self):
            replayed.append(widest)
            self.graph.replay()

    graphs.graphs[widest] = Watched(graphs.graphs[widest])
    graphs.route = {b: widest for b in graphs.buckets}
    assert run_all(engine, prompts, params, arrivals) == want
    assert len(replayed) > 20
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


@pytest.mark.parametrize("arch", ["llama", "gemma2", "mixtral"])
def test_prefill_graphs_keep_tokens(gpu_engines, arch, monkeypatch):
    """A lone prompt's prefill replays a graph of the next token bucket (padded rows go to
    the scratch block): the same greedy tokens as the eager prefill (fp32), for prompts at,
    just past and between the buckets, and one longer than the largest (eager)."""
    from kiln.runtime.cuda_graphs import PrefillGraphs

    replays = []
    run = PrefillGraphs.run
    monkeypatch.setattr(PrefillGraphs, "run",
                        lambda self, ids, *a: replays.append(ids.shape[0]) or run(self, ids, *a))
    path = gpu_engines[arch, "float32"]
    eager = LLMEngine(path, RuntimeConfig(device="cuda", prefill_graph_tokens=0))
    assert eager.runner.prefill_graphs is None
    engine = LLMEngine(path, RuntimeConfig(device="cuda", prefill_graph_tokens=256))
    assert engine.runner.prefill_graphs.buckets == [16, 32, 64, 128, 256]
    lengths = [1, 15, 16, 17, 100, 256, 300]
    rng = torch.Generator().manual_seed(0)  # no prompt shares a cached prefix with another
    prompts = [torch.randint(3, 250, (n,), generator=rng).tolist() for n in lengths]
    params = SamplingParams(max_tokens=6, **GREEDY)
    for prompt in prompts:  # one at a time: each prefill step holds only that prompt
        assert run_all(engine, [prompt], params) == run_all(eager, [prompt], params), len(prompt)
    assert replays == [n for n in lengths if 1 < n <= 256]  # 1 token: a decode graph
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


@pytest.mark.parametrize("arch", ["llama", "gemma2", "mixtral", "bloom"])
def test_piecewise_graphs_keep_tokens(gpu_engines, arch, monkeypatch):
    """Mixed steps (prompts joining running decodes, several prompts at once) replay graph
    pieces with the attention launched between them: the same greedy tokens as eager
    steps (fp32), including steps past the largest bucket (eager)."""
    from kiln.runtime.piecewise_graphs import PiecewiseGraphs

    sizes = []
    run = PiecewiseGraphs.run
    monkeypatch.setattr(PiecewiseGraphs, "run",
                        lambda self, ids, *a: sizes.append(ids.shape[0]) or run(self, ids, *a))
    path = gpu_engines[arch, "float32"]
    prompts = make_prompts(20, seed=8) + [list(range(3, 250))] * 2  # 2 x 247: past 256
    arrivals = [i // 4 for i in range(22)]
    params = [SamplingParams(max_tokens=5 + i % 7, **GREEDY) for i in range(22)]
    eager = LLMEngine(path, RuntimeConfig(device="cuda", cuda_graphs=False))
    want = run_all(eager, prompts, params, arrivals)
    engine = LLMEngine(path, RuntimeConfig(device="cuda", prefill_graph_tokens=256,
                                           piecewise_graphs=True))
    assert engine.runner.piecewise.buckets == [16, 32, 64, 128, 256]
    assert run_all(engine, prompts, params, arrivals) == want
    assert sizes and max(sizes) <= 256 and any(n > 16 for n in sizes), sizes
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_seeded_sampling_same_on_gpu_with_graphs(gpu_engines):
    path = gpu_engines["llama", "float32"]
    params = SamplingParams(max_tokens=16, temperature=0.8, top_k=20, top_p=0.9, seed=11)
    a = run_all(LLMEngine(path, RuntimeConfig(device="cuda")), [[5, 6, 7]], params)
    b = run_all(LLMEngine(path, RuntimeConfig(device="cuda", cuda_graphs=False)),
                [[5, 6, 7]], params)
    assert a == b


@pytest.mark.parametrize("quantization, kv, head", [
    ("fp8", "auto", ""), ("none", "fp8", ""), ("fp8", "fp8", ""), ("fp8", "fp8", "auto"),
    ("fp8", "auto", "int8_wo")])
def test_fp8_engine_on_gpu_matches_its_cpu_reference(quantization, kv, head, tiny_checkpoints,
                                                     tmp_path):
    """The GPU path (Triton/cuBLAS FP8 GEMMs, 1-byte KV kernels, graphs, overlap) against
    the exact CPU reference of the same fp8 engine. Not equal: Hopper's FP8 tensor cores
    accumulate in reduced precision (measured ~2.5e-3 of a row's largest output, see
    tests/test_kernels_fp8.py), and a changed sum can flip a later e4m3 rounding. Measured
    on an H200: mean |diff| 0.018 where the scheme itself moves logits by ~0.06. A wrong
    GPU path (scales, layout) errs by the scheme's whole error or more: so the mean must
    stay under half of it. head: the LM head in e4m3 (auto) or int8 too."""
    from kiln.eval import sequence_logits

    folder, _ = tiny_checkpoints["llama"]
    engine_dir = build(folder, tmp_path / "e", BuildConfig(
        dtype="float32", max_batch_size=32, max_seq_len=512, max_num_tokens=1024,
        quantization=quantization, kv_cache_dtype=kv, quantize_lm_head=head), progress=False)
    gpu = LLMEngine(engine_dir, RuntimeConfig(device="cuda"))
    cpu = LLMEngine(engine_dir, RuntimeConfig(device="cpu"))
    tokens = list(range(3, 120))
    got, want = sequence_logits(gpu, tokens), sequence_logits(cpu, tokens)
    plain = LLMEngine(build(folder, tmp_path / "f", BuildConfig(
        dtype="float32", max_batch_size=32, max_seq_len=512, max_num_tokens=1024),
        progress=False), RuntimeConfig(device="cpu"))
    scheme = (sequence_logits(plain, tokens) - want).abs().mean()
    assert (got - want).abs().mean() < 0.5 * scheme
    # Decode (graphs, overlap, 1-byte KV reads): every token the GPU engine picks is a
    # near-argmax of the exact CPU reference given the same prefix. (Equal tokens are too
    # strict on a random tiny model: its logits are nearly flat, so ties are everywhere.)
    prompts = make_prompts(8, seed=3)
    on_gpu = run_all(gpu, prompts, SamplingParams(max_tokens=16, **GREEDY))
    for i, prompt in enumerate(prompts):
        tokens = on_gpu[str(i)]
        assert len(tokens) == 16
        reference = sequence_logits(cpu, prompt + tokens)
        for i, token in enumerate(tokens):
            row = reference[len(prompt) - 1 + i]
            assert row.max() - row[token] < 0.5


@pytest.mark.parametrize("quantization, kv", [("fp8", "fp8"), ("int8_sq", "int8")])
def test_fused_activation_quant_changes_nothing(quantization, kv, tiny_checkpoints, tmp_path,
                                                monkeypatch):
    """RMSNorm and SiLU*mul writing the W8A8 GEMMs' inputs already quantized (FP8: the
    default on a GPU, and SmoothQuant's int8 since the 36th session) give the same logits
    and tokens, bit for bit, as the GEMMs quantizing their inputs in kernels of their own
    (`unfused_inputs()`, or KILN_FP8_FUSED_QUANT=0 / KILN_INT8_FUSED_QUANT=0)."""
    import contextlib

    from kiln.eval import sequence_logits
    from kiln.layers import quantization as quant_layers

    monkeypatch.setattr(quant_layers, "_FUSED_INT8_INPUT", True)
    folder, _ = tiny_checkpoints["llama"]
    engine_dir = build(folder, tmp_path / "e", BuildConfig(
        dtype="bfloat16", max_batch_size=32, max_seq_len=512, max_num_tokens=1024,
        quantization=quantization, kv_cache_dtype=kv), progress=False)
    tokens, prompts = list(range(3, 200)), make_prompts(8, seed=4)
    got = {}
    for fused in (True, False):  # graphs are captured at load: the engine lives inside
        with contextlib.nullcontext() if fused else quant_layers.unfused_inputs():
            engine = LLMEngine(engine_dir, RuntimeConfig(device="cuda"))
            downs = [m for n, m in engine.runner.model.named_modules()
                     if n.endswith("down_proj")]
            assert downs and all((m.input_quant() is not None) == fused for m in downs)
            got[fused] = (sequence_logits(engine, tokens),
                          run_all(engine, prompts, SamplingParams(max_tokens=16, **GREEDY)))
            del engine
    assert torch.equal(got[True][0], got[False][0])
    assert got[True][1] == got[False][1]


@pytest.mark.parametrize("arch, kv", [("llama", "fp8"), ("gemma2", "fp8"), ("phi", "fp8"),
                                      ("llama", "int8")])
def test_v_transposed_kv_cache_changes_nothing(arch, kv, tiny_checkpoints, tmp_path,
                                               monkeypatch):
    """A 1-byte KV cache whose V blocks hold V transposed (the default,
    kiln.kernels.paged.load_v_transposed; KILN_KV_V_TRANSPOSED=0: the usual layout) gives
    the logits and tokens of the usual layout, bit for bit: the same values reach the same
    MMAs, only loaded another way. gemma2's windowed layers keep the usual layout beside
    transposed ones; phi rotates 40% of d; int8 takes its per-head scales from a
    calibration text. The decode launch is pinned to the usual layout's (the transposed one
    takes other tiles by default: other rounding, not another layout)."""
    from kiln.eval import sequence_logits
    from kiln.kernels import attention_decode
    from kiln.runtime import model_runner

    config = attention_decode.decode_config
    monkeypatch.setattr(attention_decode, "decode_config",
                        lambda dtype, bd, bg=16, rope=False, v_t=False, split_tokens=None,
                        context=0: config(dtype, bd, bg, rope, False, split_tokens, context))

    folder, _ = tiny_checkpoints[arch]
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    engine_dir = build(folder, tmp_path / "e", BuildConfig(
        dtype="bfloat16", max_batch_size=32, max_seq_len=512, max_num_tokens=1024,
        kv_cache_dtype=kv, **(dict(calib_file=str(calib), calib_samples=2)
                              if kv == "int8" else {})), progress=False)
    tokens, prompts = list(range(3, 200)), make_prompts(8, seed=5)
    got = {}
    for v_t in (False, True):
        monkeypatch.setattr(model_runner, "V_TRANSPOSED", v_t)
        engine = LLMEngine(engine_dir, RuntimeConfig(device="cuda"))
        transposed = [a.v_cache.shape != a.k_cache.shape
                      for a in engine.runner.model.attention_layers()]
        assert any(transposed) == v_t and (arch != "gemma2" or not all(transposed))
        got[v_t] = (sequence_logits(engine, tokens),
                    run_all(engine, prompts, SamplingParams(max_tokens=16, **GREEDY)))
        del engine
    assert torch.equal(got[True][0], got[False][0])
    assert got[True][1] == got[False][1]


def _compiled_kernel_variants() -> int | None:
    """Compiled variants held by kiln's Triton kernels, or None where this Triton keeps
    them elsewhere."""
    import sys

    from triton.runtime.jit import JITFunction

    total, found = 0, False
    for name, module in list(sys.modules.items()):
        if not name.startswith("kiln.kernels.") or module is None:
            continue
        for obj in vars(module).values():
            caches = getattr(obj, "device_caches", None) if isinstance(obj, JITFunction) \
                else None
            if caches is not None:
                found = True
                total += sum(len(entry[0]) for entry in caches.values())
    return total if found else None


def test_steps_after_load_compile_nothing(gpu_engines):
    """Loading an engine (decode graphs + the eager warm-up) compiles every Triton kernel
    its steps use: prompts of many lengths, mixed prefill + decode steps whose block tables
    differ in width, greedy and sampled rows, eager decode steps (a request wants its
    prompt's logprobs) then compile nothing. A compile inside a step stalls the device for
    0.1-2 s (seen in the 128/128 throughput run on an H200)."""
    engine = LLMEngine(gpu_engines["llama", "bfloat16"], RuntimeConfig(device="cuda"))
    before = _compiled_kernel_variants()
    if before is None:
        pytest.skip("this Triton version keeps its compiled kernels elsewhere")
    prompts = make_prompts(24, seed=9) + [[7] * 300, [9] * 17, [5, 6, 7]]
    arrivals = [i // 4 for i in range(len(prompts))]
    params = [SamplingParams(max_tokens=12 + i % 7, **GREEDY) if i % 2 else
              SamplingParams(max_tokens=12, temperature=0.9, top_k=40, top_p=0.9, seed=i)
              for i in range(len(prompts))]
    params[9] = SamplingParams(max_tokens=12, prompt_logprobs=1, **GREEDY)  # eager decodes
    with CompileWatch() as watch:
        got = run_all(engine, prompts, params, arrivals)
    assert len(got) == len(prompts)
    assert watch.events == [], [(e["kernel"], e["repr"]) for e in watch.events]
    assert _compiled_kernel_variants() == before


def test_attention_sinks_on_gpu_match_the_cpu_engine(gpu_engines):
    """StreamingLLM on the GPU (keys rotated inside the Triton attention kernels, decode
    graphs, overlap) generates the CPU engine's tokens, which tests/test_streaming.py holds
    to a reference StreamingLLM: 3 requests, ~200 tokens each past a 64-token cache."""
    path = gpu_engines["llama", "float32"]
    prompts = [[7, 3, 99, 150, 41], list(range(20, 50)), [200, 6] * 9]
    params = SamplingParams(max_tokens=200, **GREEDY)
    sinks = dict(attention_sinks=4, attention_window=32)
    want = run_all(LLMEngine(path, RuntimeConfig(device="cpu", **sinks)), prompts, params)
    engine = LLMEngine(path, RuntimeConfig(device="cuda", **sinks))
    assert run_all(engine, prompts, params) == want
    assert engine.kv.num_free_blocks == engine.kv.num_blocks


def test_mixed_steps_with_decode_rows_first_match_the_cpu_engine(gpu_engines, monkeypatch):
    """Prompts arriving while others decode make mixed steps whose leading decode rows take
    the decode kernel and the prompts the prefill kernel (paged_attention_mixed):
    the greedy tokens of the CPU engine (fp32)."""
    from kiln import functional as KF
    from kiln.kernels import attention_prefill

    monkeypatch.setattr(KF, "MIXED_DECODE_ROWS", True)  # the default (env could turn it off)
    calls = []
    mixed = attention_prefill.paged_attention_mixed
    monkeypatch.setattr(attention_prefill, "paged_attention_mixed",
                        lambda *a, **k: calls.append(a[8]) or mixed(*a, **k))
    path = gpu_engines["llama", "float32"]
    prompts = make_prompts(16, seed=11)
    arrivals = [i // 2 for i in range(16)]
    params = [SamplingParams(max_tokens=6 + i % 5, **GREEDY) for i in range(16)]
    want = run_all(LLMEngine(path, RuntimeConfig(device="cpu")), prompts, params, arrivals)
    assert run_all(LLMEngine(path, RuntimeConfig(device="cuda")), prompts, params,
                   arrivals) == want
    assert calls and max(calls) >= 2, calls


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mixtral"])
def test_sdpa_prompt_attention_keeps_logits(arch, gpu_engines, monkeypatch):
    """kiln.kernels.attention_sdpa (the default; KILN_PREFILL_SDPA=0 turns it off): whole
    prompts attend through SDPA (cuDNN on Hopper) over their own K / V. A bf16 engine's logits
    of a sequence stay within 1% (relative norm) of the Triton kernel's; prompts arriving in
    64-token chunks beside decoding requests take it for their first chunks, decode rows first
    in the step, and every request runs to its end."""
    from kiln.eval import sequence_logits
    from kiln.kernels import attention_sdpa

    monkeypatch.setattr(attention_sdpa, "MIN_TOKENS", 16)  # tiny engines' short prompts
    monkeypatch.setattr(attention_sdpa, "MIN_CHUNK_TOKENS", 16)
    calls, real = [], attention_sdpa.paged_attention_sdpa
    monkeypatch.setattr(attention_sdpa, "paged_attention_sdpa",
                        lambda *a, **k: calls.append(a[5]) or real(*a, **k))
    path = gpu_engines[arch, "bfloat16"]
    tokens = list(range(3, 200))
    got = {}
    for on in (False, True):
        monkeypatch.setattr(attention_sdpa, "ENABLED", on)
        got[on] = sequence_logits(LLMEngine(path, RuntimeConfig(device="cuda")),
                                  tokens).float()
        assert bool(calls) == on
    error = ((got[True] - got[False]).norm() / got[False].norm()).item()
    assert error < 1e-2, error
    engine = LLMEngine(path, RuntimeConfig(device="cuda", max_num_tokens=64))
    prompts = [(p * 12)[:400] for p in make_prompts(8, seed=5)]
    outs = run_all(engine, prompts, SamplingParams(max_tokens=8, **GREEDY),
                   [i // 2 for i in range(8)])
    assert len(outs) == 8 and all(len(o) == 8 for o in outs.values())
    assert max(calls) >= 1, calls  # decode rows beside prompts


@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_tma_prefill_tiles_change_nothing(kv, tiny_checkpoints, tmp_path, monkeypatch):
    """An engine on 64-token KV blocks reads its prefill K / V tiles by TMA (by default,
    kiln.kernels.paged_tma) or gathers them (KILN_PREFILL_TMA=0): the same logits bit for
    bit and the same greedy tokens (bf16 and e4m3 caches; prompts over several blocks,
    mixed steps)."""
    from kiln.eval import sequence_logits
    from kiln.kernels import paged_tma

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm_90")
    folder, _ = tiny_checkpoints["llama"]
    engine_dir = build(folder, tmp_path / "e", BuildConfig(
        dtype="bfloat16", max_batch_size=32, max_seq_len=512, max_num_tokens=1024,
        kv_cache_dtype=kv, block_size=64), progress=False)
    tokens, prompts = list(range(3, 200)) * 2, make_prompts(12, seed=7) + [[5] * 260]
    arrivals = [i // 3 for i in range(len(prompts))]
    taken, descriptors = [], paged_tma.descriptors
    monkeypatch.setattr(paged_tma, "descriptors", lambda *a: taken.append(1) or descriptors(*a))
    got = {}
    for tma in (False, None):  # off, the default (on, on a Hopper GPU)
        monkeypatch.setattr(paged_tma, "ENABLED", tma)
        engine = LLMEngine(engine_dir, RuntimeConfig(device="cuda"))
        got[tma] = (sequence_logits(engine, tokens),
                    run_all(engine, prompts, SamplingParams(max_tokens=16, **GREEDY),
                            arrivals))
        del engine
        assert bool(taken) == (tma is None)
    assert torch.equal(got[None][0], got[False][0])
    assert got[None][1] == got[False][1]


@pytest.mark.parametrize("arch, quantization", [("llama", "none"), ("mixtral", "none"),
                                                 ("gemma2", "none"), ("llama", "fp8"),
                                                 ("llama", "int4_wo")])
def test_parallel_compile_at_load(arch, quantization, gpu_engines, tiny_checkpoints,
                                  tmp_path, monkeypatch):
    """KILN_COMPILE_THREADS=8 (threads are the default since the 26th session) with an
    empty Triton cache (a fresh container): the warm-up's kernels compile on threads
    (kiln.runtime.precompile; its first pass skips launches, leaving outputs unwritten),
    the warm-up after them compiles nothing, and the engine generates what one loaded
    with the kernels compiled one by one does (bf16 dense / MoE / softcapped-windowed,
    FP8 weights + FP8 KV, int4 weights)."""
    import json
    import os
    import subprocess
    import sys
    import textwrap

    path = gpu_engines[arch, "bfloat16"]
    if quantization != "none":
        path = build(tiny_checkpoints[arch][0], tmp_path / "q", BuildConfig(
            dtype="bfloat16", max_batch_size=32, max_seq_len=512, max_num_tokens=1024,
            quantization=quantization, group_size=32 if quantization == "int4_wo" else 0,
            kv_cache_dtype="fp8" if quantization == "fp8" else "auto"), progress=False)
    prompts = make_prompts(6, seed=3)
    params = SamplingParams(max_tokens=12, **GREEDY)
    from kiln.runtime import precompile
    monkeypatch.setattr(precompile, "THREADS", 0)  # the reference: compiles one by one
    want = run_all(LLMEngine(path, RuntimeConfig(device="cuda")), prompts, params)
    script = textwrap.dedent(f"""
        import json
        from kiln.runtime import warmup
        from kiln.runtime.engine import LLMEngine, RuntimeConfig
        from kiln.runtime.profiling import CompileWatch
        from kiln.runtime.request import SamplingParams
        from tests.test_runtime import run_all

        counts, real = [], warmup.warm_up

        def watched(*a, **k):
            with CompileWatch() as watch:
                out = real(*a, **k)
            counts.append(len(watch.events))
            return out

        warmup.warm_up = watched
        engine = LLMEngine({str(path)!r}, RuntimeConfig(device="cuda"))
        got = run_all(engine, {prompts!r}, SamplingParams(max_tokens=12, temperature=0,
                                                          ignore_eos=True))
        print(json.dumps({{"counts": counts,
                          "tokens": got, "phases": engine.runner.load_phases}}))
    """)
    env = dict(os.environ, KILN_COMPILE_THREADS="8", TRITON_CACHE_DIR=str(tmp_path / "tc"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, env=env, cwd=os.getcwd())
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    phases = result["phases"]  # what `kiln bench` reports as load_phases
    assert phases["kernels_on_threads"] > 10 and phases["threads_s"] > 0, result
    assert phases["warm_up_s"] > 0 and phases["graphs_s"] > 0
    assert result["counts"][0] == 0 and result["counts"][-1] == 0, result["counts"]
    assert result["tokens"] == want


def test_long_engine_graphs_compile_nothing(tiny_checkpoints, tmp_path):
    """A 32k engine whose steps take at most 1,024 tokens (the warm-up's own contexts stop
    there) with an empty Triton cache: the decode graphs' launches at the full block-table
    width (long splits on 128-key tiles, a split count per batch bucket) compile at load on
    the threads or in the warm-up (kiln.runtime.warmup.full_width_decode_steps), none
    inside the capture (33rd session: ~26 s of a cold load went there); the engine then
    generates (the tiles' numerics: tests/test_kernels_gpu.py's long-tile test)."""
    import json
    import os
    import subprocess
    import sys
    import textwrap

    path = build(tiny_checkpoints["llama"][0], tmp_path / "long", BuildConfig(
        dtype="bfloat16", max_batch_size=32, max_seq_len=32768, max_num_tokens=1024),
        progress=False)
    prompts = make_prompts(4, seed=5)
    script = textwrap.dedent(f"""
        import json
        from kiln.runtime.engine import LLMEngine, RuntimeConfig
        from kiln.runtime.model_runner import ModelRunner
        from kiln.runtime.profiling import CompileWatch
        from kiln.runtime.request import SamplingParams
        from tests.test_runtime import run_all

        counts, real = [], ModelRunner.capture_graphs

        def watched(*a, **k):
            with CompileWatch() as watch:
                out = real(*a, **k)
            counts.append([e["kernel"] for e in watch.events])
            return out

        ModelRunner.capture_graphs = watched
        engine = LLMEngine({str(path)!r}, RuntimeConfig(device="cuda"))
        got = run_all(engine, {prompts!r}, SamplingParams(max_tokens=8, temperature=0,
                                                          ignore_eos=True))
        print(json.dumps({{"counts": counts, "tokens": got}}))
    """)
    env = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "tc"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, env=env, cwd=os.getcwd())
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["counts"] == [[]], result["counts"]
    assert [len(t) for t in result["tokens"].values()] == [8] * len(prompts)


