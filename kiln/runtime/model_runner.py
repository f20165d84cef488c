"""Owns the model and the KV tensors; turns a SchedulerOutput into one forward + sampling."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import torch

from kiln.build.engine_dir import rank_file
from kiln.config import EngineConfig
from kiln.distributed import Mapping
from kiln.distributed.comm import (
    broadcast_async,
    broadcast_from,
    broadcast_object_from,
    pp_recv,
    pp_send,
)
from kiln.layers import AttentionMetadata, forward_context
from kiln.layers.quantization import QuantConfig, kv_cache_torch_dtype
from kiln.models import create_model
from kiln.runtime import speculative, transfer
from kiln.runtime.cuda_graphs import DecodeGraphs, PrefillGraphs, prefill_graph_tokens
from kiln.runtime.piecewise_graphs import PiecewiseGraphs
from kiln.runtime.profiling import phase
from kiln.runtime.prompt_logprobs import prompt_logprobs
from kiln.runtime.request import PLACEHOLDER
from kiln.runtime.sampler import SamplingBatch, sample
from kiln.runtime.scheduler import SchedulerOutput
from kiln.runtime.step import PendingStep
from kiln.runtime.weights import check_fp8_support, dummy_model, load_weights, weights_mismatch

log = logging.getLogger(__name__)


# A 1-byte KV cache's V blocks hold V transposed ([kv heads, head_dim, block_size]) on the
# GPU, so that the attention kernels' p @ v reads V the way q @ k^T reads K
# (kiln.kernels.paged.load_v_transposed: the e4m3 decode main loop compiles to 718
# instructions a 64-key tile instead of 1,179, int8's to ~1,060-1,270 instead of
# ~1,400-1,630, sm_90). H200, 8B, 24th session: FP8 + FP8 KV 1000 / 1000 +1.6% / +4.6%,
# SmoothQuant + int8 KV +3.1% (decode attention 3-8% faster). Layers with a sliding window
# or unrotated keys (attention sinks) keep the usual layout; KILN_KV_V_TRANSPOSED=0: none.
V_TRANSPOSED = os.environ.get("KILN_KV_V_TRANSPOSED", "1") != "0"


def transposes_v(attn, kv_dtype: torch.dtype, block_size: int, device: torch.device) -> bool:
    """Whether this attention layer's V cache is laid out transposed (V_TRANSPOSED): on a
    GPU, a 1-byte cache (e4m3, int8), blocks a kernel tile holds whole, no window, rotated
    keys, and a shape that tells the layouts apart (the kernels read the layout from it)."""
    return V_TRANSPOSED and device.type == "cuda" and kv_dtype.itemsize == 1 and \
        block_size in (8, 16, 32) and attn.sliding_window is None and not attn.rotate_keys \
        and (attn.num_kv_heads, attn.head_dim, block_size) != \
        (block_size, attn.num_kv_heads, attn.head_dim)


class ModelRunner:
    def __init__(self, engine_dir: Path, engine: EngineConfig, device: torch.device,
                 mapping: Mapping | None = None) -> None:
        self.engine = engine
        self.device = device
        self.mapping = mapping or Mapping()
        self.dtype = getattr(torch, engine.build.dtype)
        self.block_size = engine.build.block_size
        cfg = engine.model
        build = engine.build
        self.kv_dtype = kv_cache_torch_dtype(build.kv_cache_dtype, self.dtype)
        check_fp8_support(build.quantization, build.kv_cache_dtype, device)
        quant = QuantConfig(build.quantization if build.quantized else "none",
                            build.activation_scheme, build.quant_ignore, build.group_size,
                            tuple(build.quant_layers.items()), build.quantize_lm_head)
        if device.type == "cuda":  # PDL for the small decode kernels where the linears
            from kiln.kernels import pdl  # take part (kiln.kernels.pdl)

            pdl.set_small_kernels(pdl.linears_take_part(
                quant.method, build.quant_layers,
                torch.cuda.get_device_capability(device) == (9, 0)))
        if build.load_format == "dummy":  # random weights made here, quantized as built
            self.model = dummy_model(cfg, self.mapping, build.max_seq_len, self.dtype, device,
                                     quant, build.kv_cache_dtype)
            missing, unexpected = [], []
        else:  # the engine dir holds exactly the parameters, in place: no conversion here
            self.model = create_model(cfg, self.mapping, build.max_seq_len, self.dtype, device,
                                      quant=quant, kv_cache_dtype=build.kv_cache_dtype)
            missing, unexpected = load_weights(self.model, rank_file(engine_dir,
                                                                      self.mapping.rank), device)
        if cfg.tie_word_embeddings and not build.quantize_lm_head:
            self.model.lm_head.weight = self.model.model.embed_tokens.weight
            missing = [m for m in missing if m != "lm_head.weight"]
        if missing or unexpected:
            raise weights_mismatch(missing, unexpected)
        self.model.eval()
        if device.type == "cpu":
            from kiln import functional as KF

            packed = KF.prepack_cpu_linears(self.model)
            log.debug("packed %d linear weights for oneDNN", packed)
        # LongRoPE (Phi-3): a sequence past the original context rotates with the long
        # factors from its first token (Scheduler.check_long_rope; RotaryEmbedding keeps
        # those rows at long_offset and after).
        rotary = next((m for m in self.model.modules() if getattr(m, "long_offset", 0)), None)
        self.long_rope: tuple[int, int] | None = \
            (rotary.original_positions, rotary.long_offset) if rotary is not None else None
        self.kv_cache: torch.Tensor | None = None
        self.num_blocks = 0
        self.graphs: DecodeGraphs | None = None
        self.load_phases: dict[str, float] = {}  # seconds of the load's GPU phases
        self.prefill_graphs: PrefillGraphs | None = None
        self.piecewise: PiecewiseGraphs | None = None
        self.verify_graphs: speculative.VerifyGraphs | None = None  # set by the Speculator

    # ---- KV cache -------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        layers = self.model.attention_layers()
        a = layers[0]
        return 2 * len(layers) * self.block_size * a.num_kv_heads * a.head_dim * \
            self.kv_dtype.itemsize

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """num_blocks usable blocks, plus one scratch block for padded graph rows."""
        layers = self.model.attention_layers()
        a = layers[0]
        # Token-major blocks [block, slot, head, d]. A head-major layout (a block of one
        # head contiguous, as a strided view) measured within 1-3% on an H200
        # (benchmarks/attn_decode_sweep.py), so the simpler one stays.
        # Zeroed on the CPU, whose attention then need not mask the padding it gathers
        # (AttentionMetadata.kv_finite); the GPU kernels never read past a context.
        # A pool whose V is laid out transposed is zeroed too: those reads are unmasked
        # (kiln.kernels.paged.load_v_transposed).
        transposed = [transposes_v(a, self.kv_dtype, self.block_size, self.device)
                      for a in layers]
        alloc = torch.zeros if self.device.type == "cpu" or any(transposed) else torch.empty
        self.kv_cache = alloc(len(layers), 2, num_blocks + 1, self.block_size,
                              a.num_kv_heads, a.head_dim, dtype=self.kv_dtype,
                              device=self.device)
        for i, attn in enumerate(layers):
            attn.k_cache, attn.v_cache = self.kv_cache[i, 0], self.kv_cache[i, 1]
            if transposed[i]:
                attn.v_cache = attn.v_cache.view(  # kiln.kernels.paged.v_transposed
                    num_blocks + 1, attn.num_kv_heads, attn.head_dim, self.block_size)
        self.num_blocks = num_blocks

    def cache_keys_unrotated(self) -> None:
        """Attention sinks: K is cached before rotary and rotated as the kernels read it."""
        for layer in self.model.attention_layers():
            layer.rotate_keys = True

    def capture_graphs(self, max_batch_size: int, prefill_tokens: int = 0,
                       piecewise: bool = False) -> None:
        """CUDA-graph the decode step for every batch bucket up to max_batch_size; on one
        GPU also, for every token bucket up to prefill_tokens (0: none), a lone prompt's
        prefill (whole) and, with `piecewise`, any step's forward in pieces between its
        attention calls. All share one memory pool."""
        if self.device.type != "cuda":
            return
        started, m = time.perf_counter(), self.mapping
        max_blocks = -(-self.engine.build.max_seq_len // self.block_size)
        pool = torch.cuda.graph_pool_handle()
        prefill_tokens = prefill_graph_tokens(prefill_tokens)
        # One GPU only until measured on several (their NCCL captures are not yet tested).
        if prefill_tokens and m.world_size == 1:
            args = (self.model, prefill_tokens, max_blocks, self.block_size, self.num_blocks,
                    self.device)
            if piecewise:
                self.piecewise = PiecewiseGraphs(*args)
                log.info("captured piecewise graphs for %d token buckets in %.1f s",
                         len(self.piecewise.buckets), self.piecewise.capture(pool))
            self.prefill_graphs = PrefillGraphs(*args)
            log.info("captured %d prefill graphs (up to %d tokens) in %.1f s",
                     len(self.prefill_graphs.buckets), prefill_tokens,
                     self.prefill_graphs.capture(pool))
        self.graphs = DecodeGraphs(
            self.model, max_batch_size, max_blocks, self.block_size, self.num_blocks,
            self.device, prev_rank=m.prev_pp_rank, next_rank=m.next_pp_rank, dtype=self.dtype)
        seconds = self.graphs.capture(pool)
        log.info("captured %d decode graphs in %.1f s", len(self.graphs.buckets), seconds)
        self.load_phases["graphs_s"] = round(time.perf_counter() - started, 2)

    def warmup(self, max_num_tokens: int, max_seq_len: int, graph_batch: int = 0,
               graph_tokens: int = 0) -> float:
        """Compile the eager path's kernels before the first requests (kiln.runtime.warmup);
        seconds taken (0 off CUDA: nothing to compile). graph_batch / graph_tokens: the
        graphs captured next (kiln.runtime.precompile compiles their kernels too)."""
        from kiln.runtime import precompile
        from kiln.runtime.warmup import graph_width_steps, warm_up

        if self.device.type != "cuda":
            return 0.0
        wide = graph_width_steps(self, graph_batch, max_seq_len)
        if precompile.THREADS > 1 and self.mapping.world_size == 1:
            shaped = precompile.graph_steps(graph_batch, graph_tokens, max_seq_len) + wide
            count, seconds = precompile.compile_in_parallel(
                lambda: warm_up(self, max_num_tokens, max_seq_len, shaped, skipped=True),
                self.device, precompile.THREADS)
            log.info("compiled %d kernels on %d threads in %.1f s", count, precompile.THREADS,
                     seconds)
            self.load_phases.update(kernels_on_threads=count, threads_s=round(seconds, 2))
        seconds = warm_up(self, max_num_tokens, max_seq_len, wide)
        self.load_phases["warm_up_s"] = round(seconds, 2)
        return seconds

    # ---- one step -------------------------------------------------------------------
    def _to_device(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """A host list as a device tensor without stalling the host (kiln.runtime.transfer)."""
        return transfer.to_device(values, dtype, self.device)

    def prepare(self, out: SchedulerOutput, previous: PendingStep | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """Build the step's device tensors once. Tokens still in flight from `previous`
        (placeholders on the host) are filled in on the device, without a sync."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_starts = [0]
        seq_lens: list[int] = []
        logits_indices: list[int] = []
        bs = self.block_size
        in_flight: list[tuple[int, int]] = []  # (input position, row in previous.tokens)
        rows = previous.row_of() if previous is not None else {}
        for entry in out.scheduled:
            r = entry.request
            start, end = r.num_computed_tokens, r.num_computed_tokens + entry.num_new_tokens
            known = end - len(entry.spec_token_ids)  # drafts follow the known tokens
            if r.token_ids[known - 1] == PLACEHOLDER:
                in_flight.append((len(input_ids) + known - 1 - start, rows[r.request_id]))
            input_ids += r.token_ids[start:known] + entry.spec_token_ids
            # The attention side sees cache indices: text positions less what attention
            # sinks evicted (0 otherwise).
            c_start, c_end = start - r.num_evicted_tokens, end - r.num_evicted_tokens
            if r.rope_long and self.long_rope is not None:
                positions += range(c_start + self.long_rope[1], c_end + self.long_rope[1])
            else:
                positions += range(c_start, c_end)
            slots += [r.block_ids[p // bs] * bs + p % bs for p in range(c_start, c_end)] \
                if c_end - c_start > 1 else (r.block_ids[c_start // bs] * bs + c_start % bs,)
            query_starts.append(query_starts[-1] + end - start)
            seq_lens.append(c_end)
            if entry.sample:  # a speculating request: at its last token and each draft
                logits_indices += range(query_starts[-1] - 1 - len(entry.spec_token_ids),
                                        query_starts[-1])
        max_blocks = max(len(e.request.block_ids) for e in out.scheduled)
        table, zeros = [], [0] * max_blocks  # flat: one list, not one a row (512 a step)
        for e in out.scheduled:
            table += e.request.block_ids + zeros[len(e.request.block_ids):]

        meta = AttentionMetadata(
            slot_mapping=self._to_device(slots, torch.int64),
            block_tables=self._to_device(table, torch.int32).view(len(out.scheduled), -1),
            seq_lens=self._to_device(seq_lens, torch.int32),
            query_start_loc=self._to_device(query_starts, torch.int32),
            query_starts_host=query_starts,
            seq_lens_host=seq_lens,
            max_query_len=max(e.num_new_tokens for e in out.scheduled),
            max_seq_len=max(seq_lens),
            kv_finite=self.device.type == "cpu",
        )
        ids = self._to_device(input_ids, torch.int64)
        if in_flight:
            where, source = zip(*in_flight)
            ids[self._to_device(list(where), torch.int64)] = \
                previous.tokens[self._to_device(list(source), torch.int64)]  # type: ignore[union-attr]
        return (ids, self._to_device(positions, torch.int64), meta,
                self._to_device(logits_indices, torch.int64))

    def _verify(self, logits: torch.Tensor, entries: list, prompt_lp: dict) -> PendingStep:
        """A verify step's tokens; with several (tensor-parallel) ranks, rank 0's on all of
        them, as for plain steps: every rank's engine then applies the same tokens even if
        its logits differed in a last bit."""
        step = speculative.verify(logits, entries, self.engine.model.vocab_size, self.device,
                                  prompt_lp)
        if self.mapping.world_size > 1 and step.tokens is not None:
            step.tokens = broadcast_from(step.tokens.contiguous(), self.last_stage_rank)
        return step

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, previous: PendingStep | None = None) -> PendingStep:
        """Enqueue the step's forward and sampling; returns before the device finishes."""
        if self.verify_graphs is not None and any(e.spec_token_ids for e in out.scheduled) \
                and self.verify_graphs.can_run(out.scheduled):
            return self._verify(self.verify_graphs.run(out.scheduled), out.scheduled, {})
        with phase("kiln.prepare"):
            input_ids, positions, meta, logits_indices = self.prepare(out, previous)
        sampling = [e.request for e in out.scheduled if e.sample]
        decode = meta.max_query_len == 1 and len(sampling) == len(out.scheduled) and \
            not any(r.prompt_logprobs is not None for r in sampling)
        if decode and self.graphs is not None and \
                self.graphs.can_run(len(sampling), meta.block_tables.shape[1]):
            with phase("kiln.forward"):
                logits, prompt_lp = self.graphs.run(input_ids, positions, meta), {}
        elif self.prefill_graphs is not None and self.prefill_graphs.can_run(
                out.scheduled, input_ids.shape[0], meta.block_tables.shape[1]):
            with phase("kiln.forward"):
                logits, prompt_lp = self.prefill_graphs.run(input_ids, positions, meta), {}
        else:
            with phase("kiln.forward"):
                if self.piecewise is not None and \
                        self.piecewise.can_run(out.scheduled, input_ids.shape[0]):
                    hidden = self.piecewise.run(input_ids, positions, meta)
                else:
                    hidden = self._forward(input_ids, positions, meta)
            prompt_lp = {}
            if any(e.request.prompt_logprobs is not None for e in out.scheduled):
                if hidden is not None:
                    prompt_lp = prompt_logprobs(self.model, out, hidden, meta.query_starts_host)
                if self.mapping.pp_size > 1:
                    prompt_lp = broadcast_object_from(prompt_lp, self.last_stage_rank)
            if not sampling:
                return PendingStep([], [], None, None, None, prompt_lp)
            with phase("kiln.forward"):
                logits = None if hidden is None else \
                    self.model.compute_logits(hidden[logits_indices])
            if logits is not None and any(e.spec_token_ids for e in out.scheduled):
                return self._verify(logits, [e for e in out.scheduled if e.sample], prompt_lp)
        vocab = self.engine.model.vocab_size
        batch = SamplingBatch.from_requests(sampling, vocab, self.device)
        if logits is not None:
            with phase("kiln.sample"):
                tokens, lp, lp_ids = sample(logits, batch)
        else:  # an earlier pipeline stage: the last one sends the results below
            tokens = torch.empty(len(sampling), dtype=torch.int64, device=self.device)
            lp = lp_ids = None
            if batch.wants_logprobs:
                lp = torch.empty(len(sampling), batch.max_logprobs + 1, device=self.device)
                lp_ids = torch.empty(lp.shape, dtype=torch.int64, device=self.device)
        ready, side, received = None, None, None
        if self.mapping.world_size > 1 and self.mapping.pp_size > 1 and \
                self.device.type != "cuda":
            # A CPU pipeline stage must not block in the broadcast (until the last stage
            # has sampled): it goes on to its next micro-batch and waits in result().
            received = [broadcast_async(t, self.last_stage_rank) for t in
                        ((tokens, lp, lp_ids) if lp is not None else (tokens,))]
        elif self.mapping.world_size > 1:  # every rank's engine applies the same tokens
            side = self._side_stream()
            if side is not None:
                # An earlier pipeline stage receives the tokens on a side stream, so its
                # next micro-batch's forward does not queue behind this one's sampling on
                # the last stage; the host waits for them through `ready`.
                side.wait_stream(torch.cuda.current_stream(self.device))
                for t in (tokens, lp, lp_ids):
                    if t is not None:
                        t.record_stream(side)
            with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                tokens = broadcast_from(tokens.contiguous(), self.last_stage_rank)
                if lp is not None and self.mapping.pp_size > 1:
                    lp = broadcast_from(lp.contiguous(), self.last_stage_rank)
                    lp_ids = broadcast_from(lp_ids.contiguous(), self.last_stage_rank)
                if side is not None:
                    ready = torch.cuda.Event()
                    ready.record(side)
        indices = [len(r.token_ids) for r in sampling]
        pending = PendingStep(sampling, indices, tokens, lp, lp_ids, prompt_lp, ready,
                              received)
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            pending.copy_to_host()
        return pending

    def _side_stream(self) -> torch.cuda.Stream | None:
        """The stream an earlier pipeline stage receives sampled tokens on (CUDA only)."""
        if self.device.type != "cuda" or self.mapping.pp_size == 1 or \
                self.mapping.is_last_pp_rank:
            return None
        if getattr(self, "_tokens_stream", None) is None:
            self._tokens_stream = torch.cuda.Stream(self.device)
        return self._tokens_stream

    @property
    def last_stage_rank(self) -> int:
        """The rank whose sampled tokens every rank applies: TP rank 0 of the last stage."""
        return (self.mapping.pp_size - 1) * self.mapping.tp_size

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor | None:
        """Final hidden states on the last pipeline stage, None on the others (which pass
        their activations on to the next stage)."""
        m = self.mapping
        intermediate = None
        if not m.is_first_pp_rank:
            hidden_size = self.engine.model.hidden_size
            shape = (input_ids.shape[0], hidden_size)
            intermediate = pp_recv((shape, shape), self.dtype, self.device, m.prev_pp_rank)
        with forward_context(meta):
            out = self.model(input_ids, positions, intermediate)
        if m.is_last_pp_rank:
            return out
        pp_send(out, m.next_pp_rank)
        return None

    @torch.inference_mode()
    def forward_logits(self, out: SchedulerOutput) -> torch.Tensor:
        """Logits of every scheduled token (for perplexity and prompt logprobs)."""
        input_ids, positions, meta, _ = self.prepare(out)
        hidden = self._forward(input_ids, positions, meta)
        if self.mapping.pp_size == 1:
            return self.model.compute_logits(hidden)
        logits = self.model.compute_logits(hidden) if hidden is not None else torch.empty(
            input_ids.shape[0], self.engine.model.vocab_size, device=self.device)
        return broadcast_from(logits.contiguous(), self.last_stage_rank)
