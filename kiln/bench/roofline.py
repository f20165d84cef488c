"""What the hardware allows a benchmark: the bytes a batch-1 decode step must read, and
the floor of an offline throughput run (its GEMM FLOPs at the card's measured dense GEMM
rate plus the KV cache its decode steps must read at the measured copy bandwidth), so that
`kiln bench` reports its result as a share of what the card can do."""

from __future__ import annotations

from typing import Any

import torch

from kiln.runtime.engine import LLMEngine

GEMM_SIZE = 8192  # M = N = K of the rate measurement: a big prefill chunk's GEMMs


def _seconds_per_call(call: Any, reps: int) -> float:
    """Device time of call() (CUDA events), after 3 warm-up calls."""
    for _ in range(3):
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / reps


def measured_copy_bandwidth(device: torch.device) -> float | None:
    """Device memory bandwidth in GB/s from a large device-to-device copy (read + write)."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / _seconds_per_call(lambda: dst.copy_(src), 20) / 1e9


def measured_gemm_rate(device: torch.device, dtype: torch.dtype, fp8: bool) -> float | None:
    """Dense GEMM rate in TFLOP/s at 8192 x 8192 x 8192, the way kiln's linears call it
    at hundreds of rows: cuBLAS in the model dtype, or torch._scaled_mm with rowwise scales
    for FP8 engines. None off CUDA, or where the measurement cannot run (memory): the
    floor is then left out and the benchmark's result stands."""
    if device.type != "cuda":
        return None
    try:
        return _gemm_rate(device, dtype, fp8)
    except (RuntimeError, torch.OutOfMemoryError):
        torch.cuda.empty_cache()
        return None


def _gemm_rate(device: torch.device, dtype: torch.dtype, fp8: bool) -> float:
    n = GEMM_SIZE
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    if fp8:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
        sa = torch.ones(n, 1, device=device)
        sb = torch.ones(1, n, device=device)

        def call() -> torch.Tensor:
            return torch._scaled_mm(a8, b8.t(), scale_a=sa, scale_b=sb, out_dtype=dtype)
    else:
        def call() -> torch.Tensor:
            return a @ b.t()
    return 2 * n**3 / _seconds_per_call(call, 10) / 1e12


def decode_bytes_per_token(engine: LLMEngine, context_len: int) -> int:
    """Bytes one batch-1 decode step must read: every weight but the embedding table
    (one row of it) and, in an MoE model, but the experts the token is not routed to
    (top_k of num_experts per layer), plus the KV cache of the context."""
    model = engine.runner.model
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    cfg = engine.config.model
    if cfg.num_experts:
        from kiln.layers.moe import Experts

        idle = 1 - cfg.num_experts_per_tok / cfg.num_experts
        weights -= int(idle * sum(p.numel() * p.element_size() for m in model.modules()
                                  if isinstance(m, Experts) for p in m.parameters()))
    if not engine.config.model.tie_word_embeddings:
        embed = model.model.embed_tokens.weight
        weights -= embed.numel() * embed.element_size()
    kv = engine.runner.kv_bytes_per_block() * context_len // engine.runner.block_size
    return weights + kv


def flops_per_token(engine: LLMEngine) -> tuple[float, float]:
    """(decoder layers, LM head): the FLOPs of one token's products with the weights on this
    rank (2 per multiply-add; an MoE layer counts its top_k routed experts)."""
    from kiln.layers.linear import LinearBase
    from kiln.layers.moe import Experts

    cfg = engine.config.model
    model = engine.runner.model
    layers = 0.0
    for m in model.model.modules():
        if isinstance(m, LinearBase):
            layers += 2.0 * m.in_features * m.out_features
        elif isinstance(m, Experts):
            layers += 2.0 * 3 * m.hidden_size * m.inter * cfg.num_experts_per_tok
    head = model.lm_head
    rows = getattr(head, "rows_per_rank", None) or head.out_features
    return layers, 2.0 * rows * cfg.hidden_size


def throughput_floor(engine: LLMEngine, num_requests: int, input_len: int, output_len: int,
                     bandwidth_gb_s: float, gemm_tflops: float) -> dict[str, Any]:
    """The least time an offline run of num_requests x input_len in / output_len out can
    take on this rank, the kernels one after another (as they run):

    - prefill: every prompt token through the layers (the LM head on the last one only)
      and causal attention, at the GEMM rate;
    - decode: steps of up to max_batch_size rows, each the larger of its weight reads at
      the copy bandwidth and its GEMM FLOPs at the GEMM rate;
    - the KV cache every decode step reads: the context of each of its rows (input_len + j
      for output token j), at the copy bandwidth.

    Preemption, padding and small kernels are not in it: they are what a run loses."""
    layers, head = flops_per_token(engine)
    attention = engine.runner.model.attention_layers()
    rate, bandwidth = gemm_tflops * 1e12, bandwidth_gb_s * 1e9
    # causal attention over a prompt: QK^T and PV, about input_len^2 / 2 pairs each
    attn = sum(2.0 * a.num_heads * a.head_dim * input_len**2 for a in attention)
    prefill_s = num_requests * (input_len * layers + head + attn) / rate
    weights = decode_bytes_per_token(engine, 0)
    decode_s = 0.0
    left, batch = num_requests, engine.max_batch_size
    while left > 0:
        rows = min(left, batch)
        decode_s += (output_len - 1) * max(weights / bandwidth, rows * (layers + head) / rate)
        left -= rows
    kv_per_token = engine.runner.kv_bytes_per_block() / engine.runner.block_size
    steps = output_len - 1
    kv_tokens = num_requests * (steps * input_len + steps * (steps + 1) / 2)
    kv_s = kv_tokens * kv_per_token / bandwidth
    floor_s = prefill_s + decode_s + kv_s
    return {"copy_bandwidth_gb_s": bandwidth_gb_s, "gemm_tflops": gemm_tflops,
            "prefill_s": prefill_s, "decode_gemm_s": decode_s, "kv_read_s": kv_s,
            "seconds": floor_s, "output_tok_s": num_requests * output_len / floor_s}
