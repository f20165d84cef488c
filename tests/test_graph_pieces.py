"""What the CUDA-graph paths rest on, checked on the CPU: the token buckets, the decode
graphs' one logits buffer (their forwards run eagerly here), and the attention layers'
hand-off to a piecewise capture (kiln.layers.attention.split_at_attention: each layer
gives up (itself, q, cos_sin) and reads its output from the buffer returned)."""

from __future__ import annotations

import pytest
import torch

from kiln.layers import AttentionMetadata, forward_context
from kiln.layers.attention import current_metadata, split_at_attention
from kiln.runtime.cuda_graphs import DecodeGraphs, TokenBuckets, prefill_buckets
from kiln.runtime.engine import LLMEngine, RuntimeConfig


def test_prefill_buckets():
    assert prefill_buckets(2048) == [16, 32, 64, 128, 256] + list(range(384, 2049, 128))
    assert prefill_buckets(256) == [16, 32, 64, 128, 256]
    assert prefill_buckets(100) == [16, 32, 64, 100]
    for limit in (16, 100, 300, 2048):
        buckets = prefill_buckets(limit)
        assert buckets == sorted(set(buckets)) and buckets[-1] == limit
        for n in range(1, limit + 1):  # every count pads by at most a third past 256
            b = next(b for b in buckets if b >= n)
            assert b < 2 * n + 16 and (n <= 256 or b <= n + 128)


def test_token_buckets_stage_pads_to_the_scratch_block():
    staged = TokenBuckets(64, block_size=16, scratch_block=5, device=torch.device("cpu"))
    staged.input_ids.fill_(-1)  # what an earlier, longer step left behind
    staged.positions.fill_(-1)
    ids, pos = torch.arange(100, 120), torch.arange(7, 27)
    slots = torch.arange(200, 220)
    meta = AttentionMetadata(slot_mapping=slots, block_tables=torch.zeros(1, 2, dtype=torch.int32),
                             seq_lens=torch.tensor([27]), query_start_loc=torch.tensor([0, 20]),
                             query_starts_host=[0, 20], seq_lens_host=[27], max_query_len=20,
                             max_seq_len=27)
    assert staged.stage(ids, pos, meta) == 32
    assert staged.input_ids[:20].equal(ids) and staged.positions[:20].equal(pos)
    assert staged.slot_mapping[:20].equal(slots)
    assert not staged.input_ids[20:32].any() and not staged.positions[20:32].any()
    assert (staged.slot_mapping[20:32] == 5 * 16).all()  # padded rows' K/V: scratch block
    assert (staged.input_ids[32:] == -1).all()  # past the bucket: untouched, never read


class HiddenFromIds(torch.nn.Module):
    """A stand-in forward (DecodeGraphs' metadata is the GPU kernels'): the embedding of
    the ids as the hidden rows, and the real model's LM head (and soft cap)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.inner, self.config = model, model.config

    def forward(self, input_ids, positions):
        return self.inner.model.embed_tokens(input_ids) * 0.5 + positions[:, None]

    def compute_logits(self, hidden, out=None):
        return self.inner.compute_logits(hidden, out=out)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])  # gemma2: the final soft cap
def test_decode_graph_logits_are_views_of_one_buffer(tiny_engines, arch):
    """Every bucket's logits land in one float32 buffer (not one per bucket: sum(buckets)
    rows of the vocab, GBs at a max batch of 512), the values of compute_logits."""
    runner = LLMEngine(tiny_engines[arch], RuntimeConfig(device="cpu")).runner
    model = HiddenFromIds(runner.model)
    graphs = DecodeGraphs(model, 16, 4, runner.block_size, runner.num_blocks,
                          torch.device("cpu"), dtype=runner.dtype)
    gen = torch.Generator().manual_seed(0)
    want = {}
    for bs in reversed(graphs.buckets):  # as capture() runs them: the largest first
        graphs.input_ids.copy_(torch.randint(3, 200, (16,), generator=gen))
        graphs.positions.copy_(torch.randint(0, 9, (16,), generator=gen))
        with torch.inference_mode(), forward_context(graphs._meta(bs)):
            graphs._stage_forward(bs)
            want[bs] = runner.model.compute_logits(
                model(graphs.input_ids[:bs], graphs.positions[:bs]))
        assert graphs.logits[bs].equal(want[bs])
    base = graphs.logits_buffer
    assert base.shape == (16, want[16].shape[1]) and base.dtype == torch.float32
    for bs, logits in graphs.logits.items():
        assert logits.data_ptr() == base.data_ptr() and logits.shape[0] == bs
    if arch == "gemma2":  # the cap bends them: |logits| <= 2
        assert base.abs().max() <= runner.model.config.final_logit_softcap


class EagerSplitter:
    """Attends at once into a buffer of its own, as a replay does between two pieces."""

    def __init__(self) -> None:
        self.layers: list = []

    def attention(self, layer, q, cos_sin):
        self.layers.append(layer)
        out = torch.full(q.shape, float("nan"), dtype=q.dtype)
        result = layer.attend(q, current_metadata(), cos_sin, out=out)
        assert result is out
        return out


@pytest.mark.parametrize("arch", ["llama", "gemma2", "bloom", "mixtral"])
def test_split_at_attention_hands_over_every_layer(tiny_engines, arch):
    engine = LLMEngine(tiny_engines[arch], RuntimeConfig(device="cpu"))
    tokens = [5, 9, 2, 7, 11, 4, 4, 8, 30, 12]
    want = engine.sequence_logits(tokens)
    splitter = EagerSplitter()
    with split_at_attention(splitter):
        got = engine.sequence_logits(tokens)
    assert splitter.layers == engine.runner.model.attention_layers()
    assert torch.equal(got, want)
    assert engine.sequence_logits(tokens).equal(want)  # the hand-off ends with the block


def test_prefill_graph_tokens_reaches_the_runtime_from_the_command_line(tiny_engines):
    """`kiln run | serve | chat | eval --prefill-graph-tokens N` becomes the engine's
    RuntimeConfig (0 turns the prefill graphs off)."""
    import argparse

    from kiln.config import add_build_arguments, limits_from_args
    from kiln.llm import LLM

    p = argparse.ArgumentParser()
    add_build_arguments(p)
    assert "prefill_graph_tokens" not in limits_from_args(p.parse_args([]))
    options = limits_from_args(p.parse_args(["--prefill-graph-tokens", "0"]))
    assert options == {"prefill_graph_tokens": 0}
    llm = LLM(tiny_engines["llama"], device="cpu", **options)
    assert llm.engine.runtime.prefill_graph_tokens == 0
