"""Steps of any mix (prompts and decode rows together) as CUDA graph pieces, with the
attention calls run eagerly between them.

A decode graph fixes the step's shape (one token per sequence) and a prefill graph a
lone prompt's; a mixed step (new prompts joining running decodes, several prompts at
once) has neither, and launched eagerly its ~10 kernels a layer cost the host longer
than the GPU needs to run them until the step holds a few thousand tokens (FP8 most:
its activations are quantized by kernels of their own). Everything in a layer except
attention depends only on the step's token count, so the forward is captured per token
bucket as pieces that end at each attention call (33 graphs for 32 layers); at replay
the attention kernel, whose launch depends on the step's sequences, runs eagerly
between two pieces, reading q from and writing its output to buffers the pieces share.
vLLM's piecewise CUDA graphs do the same through torch.compile; here the attention
layer itself ends the piece (kiln.layers.attention.split_at_attention).

Padded rows read token 0 at position 0 and write their K/V into the scratch block; the
eager attention sees only the real rows (the step's own metadata), and only the real
rows' hidden states are returned. Single-GPU engines for now.

Every attention call of every bucket reads q from one buffer and writes into one other
(a piece copies its q in): kept per layer and bucket, the q views (holding the QKV
outputs) and the outputs would pin ~12 GB of an 8B model's graph pool at 2048 tokens.
"""

from __future__ import annotations

import time

import torch

from kiln.errors import KilnError
from kiln.layers import AttentionMetadata, forward_context
from kiln.layers.attention import split_at_attention
from kiln.runtime.cuda_graphs import TokenBuckets


class PiecewiseGraphs(TokenBuckets):
    def __init__(self, model: torch.nn.Module, max_tokens: int, max_blocks_per_seq: int,
                 block_size: int, scratch_block: int, device: torch.device) -> None:
        super().__init__(max_tokens, block_size, scratch_block, device)
        self.model = model
        self.max_blocks = max_blocks_per_seq
        self.device = device
        self.q_buf: torch.Tensor | None = None  # [n, heads, d]: every call's q and output
        self.out_buf: torch.Tensor | None = None
        # per bucket: the graph pieces, the attention calls between them, the output
        self.pieces: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.calls: dict[int, list[tuple]] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self.pool = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._tokens = 0

    # ---- capture ---------------------------------------------------------------------
    def _warmup_meta(self, tokens: int) -> AttentionMetadata:
        """One sequence of `tokens` new tokens over the scratch block only."""
        i32 = dict(dtype=torch.int32, device=self.device)
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:tokens],
            block_tables=torch.full((1, self.max_blocks), self.scratch_block, **i32),
            seq_lens=torch.tensor([tokens], **i32),
            query_start_loc=torch.tensor([0, tokens], **i32), query_starts_host=[0, tokens],
            seq_lens_host=[tokens], max_query_len=tokens,
            max_seq_len=self.max_blocks * self.block_size)

    def _begin_piece(self) -> None:
        self._graph = torch.cuda.CUDAGraph()
        self._graph.capture_begin(pool=self.pool)

    def _end_piece(self) -> None:
        self._graph.capture_end()
        self.pieces[self._tokens].append(self._graph)

    def attention(self, layer: torch.nn.Module, q: torch.Tensor, cos_sin: torch.Tensor
                  ) -> torch.Tensor:
        """Called by each attention layer during capture: ends the piece, records the
        call, starts the next piece; returns the buffer the attention will write."""
        tokens = q.shape[0]
        if self.q_buf is None:  # the first call of the largest bucket: in the graphs' pool
            self.q_buf = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            self.out_buf = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if self.q_buf.shape[1:] != q.shape[1:] or self.q_buf.dtype != q.dtype:
            raise RuntimeError("piecewise graphs: attention layers of different head shapes")
        self.q_buf[:tokens].copy_(q)
        q, out = self.q_buf[:tokens], self.out_buf[:tokens]
        self._end_piece()
        self.calls[self._tokens].append((layer, q, out, cos_sin))
        self._begin_piece()
        return out

    @torch.inference_mode()
    def capture(self, pool: tuple | None = None) -> float:
        """Capture every bucket, largest first, into `pool` (torch.cuda.graph_pool_handle();
        shared with the other graphs: all are replayed one at a time on one stream)."""
        started = time.perf_counter()
        shapes = {(a.num_heads, a.head_dim) for a in self.model.attention_layers()}
        if len(shapes) > 1:  # one shared q / output buffer serves every layer
            raise KilnError(f"piecewise_graphs needs attention layers of one shape (heads, "
                            f"head_dim); this model has {sorted(shapes)}: leave it off")
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for tokens in reversed(self.buckets):
            meta = self._warmup_meta(tokens)
            with forward_context(meta):  # compile kernels, settle allocations
                self.model(self.input_ids[:tokens], self.positions[:tokens])
            torch.cuda.synchronize(self.device)
            self._tokens, self.pieces[tokens], self.calls[tokens] = tokens, [], []
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream), forward_context(meta), split_at_attention(self):
                self._begin_piece()
                self.hidden[tokens] = self.model(self.input_ids[:tokens],
                                                 self.positions[:tokens])
                self._end_piece()
            torch.cuda.current_stream(self.device).wait_stream(stream)
        self._graph = None
        torch.cuda.synchronize(self.device)
        return time.perf_counter() - started

    # ---- replay ----------------------------------------------------------------------
    def can_run(self, scheduled: list, num_tokens: int) -> bool:
        """Steps of up to the largest bucket's tokens; not those that want prompt
        logprobs (every row's hidden state) or verify drafts."""
        return num_tokens <= self.buckets[-1] and not any(
            e.spec_token_ids or e.request.prompt_logprobs is not None for e in scheduled)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
            ) -> torch.Tensor:
        """Final hidden states [num_tokens, hidden] of a step whose tensors are on device
        (valid until the next replay of the same bucket)."""
        n = input_ids.shape[0]
        tokens = self.stage(input_ids, positions, meta)
        calls = self.calls[tokens]
        for i, piece in enumerate(self.pieces[tokens]):
            piece.replay()
            if i < len(calls):
                layer, q, out, cos_sin = calls[i]
                layer.attend(q[:n], meta, cos_sin, out=out[:n])
        return self.hidden[tokens][:n]
