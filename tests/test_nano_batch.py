"""A decode step in two halves (kiln.runtime.nano_batch): the split's arithmetic on the CPU
(the halves one after the other; on a GPU they run on two streams inside the decode
graphs, tests/test_gpu_engine.py)."""

from __future__ import annotations

import pytest
import torch

from kiln.errors import KilnError
from kiln.layers.attention import current_metadata
from kiln.runtime import nano_batch
from kiln.runtime.engine import LLMEngine, RuntimeConfig
from kiln.runtime.request import SamplingParams
from tests.test_runtime import make_prompts, run_all

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "mixtral"])
def test_halves_give_the_same_tokens(arch, tiny_engines):
    """Every decode step of an even row count run as two halves through the layers (the
    halves' metadata sliced from the step's): the same greedy tokens as whole steps, with
    requests arriving and finishing at different steps (float32)."""
    prompts = make_prompts(12, seed=3)
    arrivals = [i // 2 for i in range(12)]
    params = [SamplingParams(max_tokens=3 + i, **GREEDY) for i in range(12)]
    want = run_all(LLMEngine(tiny_engines[arch], RuntimeConfig(device="cpu")), prompts, params,
                   arrivals)
    engine = LLMEngine(tiny_engines[arch], RuntimeConfig(device="cpu"))
    model = engine.runner.model
    nano = nano_batch.NanoBatch(model, 2)
    whole = model.forward
    split_rows = []

    def forward(input_ids, positions, intermediate=None):
        meta = current_metadata()
        rows = input_ids.shape[0]
        if intermediate is None and meta.max_query_len == 1 and nano.applies(rows):
            split_rows.append(rows)
            return nano.forward(input_ids, positions, meta)
        return whole(input_ids, positions, intermediate)

    model.forward = forward
    assert run_all(engine, prompts, params, arrivals) == want
    assert len(split_rows) > 5 and max(split_rows) >= 6, split_rows


def test_halve_slices_a_decode_step():
    from kiln.layers import AttentionMetadata

    meta = AttentionMetadata(
        slot_mapping=torch.arange(6) * 10, block_tables=torch.arange(12).view(6, 2),
        seq_lens=torch.tensor([3, 4, 5, 6, 7, 8]), query_start_loc=torch.arange(7),
        query_starts_host=list(range(7)), seq_lens_host=[3, 4, 5, 6, 7, 8], max_query_len=1,
        max_seq_len=32, kv_finite=True)
    a, b = nano_batch.halve(meta, 6)
    assert b.slot_mapping.tolist() == [30, 40, 50] and b.block_tables[0].tolist() == [6, 7]
    assert a.seq_lens_host == [3, 4, 5] and b.seq_lens_host == [6, 7, 8]
    assert a.query_start_loc.tolist() == b.query_start_loc.tolist() == [0, 1, 2, 3]
    assert b.query_starts_host == [0, 1, 2, 3] and b.kv_finite and b.max_seq_len == 32
    with pytest.raises(AssertionError, match="decode step"):
        nano_batch.halve(meta, 5)


def test_setting(monkeypatch):
    monkeypatch.delenv("KILN_NANO_BATCH", raising=False)
    assert nano_batch.min_rows_from_env() == 0
    monkeypatch.setenv("KILN_NANO_BATCH", "128")
    assert nano_batch.min_rows_from_env() == 128
    for bad in ("1", "half"):
        monkeypatch.setenv("KILN_NANO_BATCH", bad)
        with pytest.raises(KilnError, match="0 \\(off\\) or a row count >= 2"):
            nano_batch.min_rows_from_env()


def test_halves_never_share_a_split_k_workspace(tiny_checkpoints, tmp_path):
    """The split-K GEMMs share one set of counters a device, so halves that would run them
    at once are not taken: FP8 from 17 rows a half (its split-K launch is for up to 16),
    integer weights never; unquantized weights from 1 row a half."""
    from kiln.build import build
    from kiln.config import BuildConfig

    folder = tiny_checkpoints["llama"][0]
    for quantization, smallest in (("none", 2), ("fp8", 34), ("int8_wo", None)):
        cfg = BuildConfig(dtype="float32", max_batch_size=8, max_seq_len=64,
                          max_num_tokens=64, quantization=quantization)
        engine = LLMEngine(build(folder, tmp_path / quantization, cfg, progress=False),
                           RuntimeConfig(device="cpu"))
        nano = nano_batch.NanoBatch(engine.runner.model, 2)
        taken = [rows for rows in range(2, 80) if nano.applies(rows)]
        assert (taken[0] if taken else None) == smallest, quantization
        assert all(rows % 2 == 0 for rows in taken)
