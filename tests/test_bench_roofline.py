"""The floor `kiln bench throughput` reports its result against (kiln.bench.roofline): GEMM
FLOPs at the card's GEMM rate plus the KV cache decode must read at its copy bandwidth,
counted here by hand from the model's shape."""

from __future__ import annotations

import pytest
import torch

from kiln.bench.roofline import decode_bytes_per_token, flops_per_token, throughput_floor
from kiln.runtime.engine import LLMEngine, RuntimeConfig


@pytest.fixture(scope="module")
def engine(tiny_engines):
    return LLMEngine(tiny_engines["llama"], RuntimeConfig(device="cpu"))


def test_flops_per_token_count_every_product_with_the_weights(engine):
    cfg = engine.config.model
    h = cfg.hidden_size
    per_layer = 2 * (h * (cfg.q_size + 2 * cfg.kv_size) + cfg.q_size * h
                     + 3 * h * cfg.intermediate_size)  # qkv, o, gate_up, down
    assert flops_per_token(engine) == (cfg.num_layers * per_layer, 2 * cfg.vocab_size * h)


def test_throughput_floor_adds_gemms_and_kv_reads(engine):
    cfg = engine.config.model
    layers, head = flops_per_token(engine)
    rate, bandwidth = 2e9, 1e9  # FLOP/s, bytes/s: small numbers, same arithmetic
    f = throughput_floor(engine, 3, 10, 5, bandwidth_gb_s=1.0, gemm_tflops=2e-3)
    attention = cfg.num_layers * 2 * cfg.num_heads * cfg.head_dim * 10**2
    assert f["prefill_s"] == pytest.approx(3 * (10 * layers + head + attention) / rate)
    # 4 decode steps of the 3 requests in one wave (max batch 16): weights or GEMMs
    weights = decode_bytes_per_token(engine, 0)
    assert f["decode_gemm_s"] == pytest.approx(
        4 * max(weights / bandwidth, 3 * (layers + head) / rate))
    # output token j (1..4) reads a context of 10 + j tokens: 50 per request
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4  # float32
    assert f["kv_read_s"] == pytest.approx(3 * 50 * kv_per_token / bandwidth)
    assert f["seconds"] == pytest.approx(f["prefill_s"] + f["decode_gemm_s"] + f["kv_read_s"])
    assert f["output_tok_s"] == pytest.approx(3 * 5 / f["seconds"])
    # more requests than a batch: decode runs in waves of max_batch_size rows
    many = throughput_floor(engine, 40, 10, 5, bandwidth_gb_s=1.0, gemm_tflops=2e-3)
    waves = [16, 16, 8]
    assert many["decode_gemm_s"] == pytest.approx(
        sum(4 * max(weights / bandwidth, rows * (layers + head) / rate) for rows in waves))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fp8", [False, True])
def test_gemm_rate_is_measured_on_the_gpu(fp8):
    """The rate the floor uses: bf16 cuBLAS, or torch._scaled_mm (FP8 cards only), within
    what a GPU can do (an H200: ~0.8 PFLOP/s bf16, ~1.3 FP8)."""
    from kiln.bench.roofline import measured_gemm_rate

    if fp8 and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 GEMMs need sm_89+")
    rate = measured_gemm_rate(torch.device("cuda"), torch.bfloat16, fp8)
    assert rate is not None and 10 < rate < 5000


def test_gemm_rate_is_none_off_cuda():
    from kiln.bench.roofline import measured_gemm_rate

    assert measured_gemm_rate(torch.device("cpu"), torch.float32, False) is None
