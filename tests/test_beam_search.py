"""Beam search: the same beams and scores as transformers' generate(num_beams=...)."""

from __future__ import annotations

import pytest
import torch

from kiln import LLM
from kiln.runtime.beam_search import BeamSearchParams

PROMPTS = [[5, 17, 99, 3, 42], [250, 1, 8, 60, 61, 62, 63]]


@pytest.fixture(scope="module")
def setup(tiny_checkpoints, tiny_engines):
    _, hf = tiny_checkpoints["llama"]
    return hf, LLM(tiny_engines["llama"], device="cpu")


def hf_beams(hf, prompt, width, max_new, length_penalty, early_stopping, eos):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=width,
                          max_new_tokens=max_new, length_penalty=length_penalty,
                          early_stopping=early_stopping, do_sample=False, eos_token_id=eos,
                          pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    beams = []
    for seq, score in zip(out.sequences, out.sequences_scores):
        tokens = seq[len(prompt):].tolist()
        if eos is not None and eos in tokens:
            tokens = tokens[:tokens.index(eos) + 1]
        beams.append((tokens, score.item()))
    return beams


@pytest.mark.parametrize("width, length_penalty, early_stopping", [
    (4, 1.0, False), (3, 0.5, True), (4, 2.0, "never"), (2, 1.0, False)])
@pytest.mark.parametrize("with_eos", [False, True])
def test_beams_match_transformers(setup, width, length_penalty, early_stopping, with_eos):
    hf, llm = setup
    max_new = 10
    for prompt in PROMPTS:
        eos = None
        if with_eos:  # an EOS the model actually produces, so hypotheses end early
            eos = hf_beams(hf, prompt, width, max_new, length_penalty, early_stopping,
                           None)[1][0][3]
        want = hf_beams(hf, prompt, width, max_new, length_penalty, early_stopping, eos)
        llm.engine.eos_token_ids = (eos,) if eos is not None else ()
        params = BeamSearchParams(beam_width=width, max_tokens=max_new,
                                  length_penalty=length_penalty, early_stopping=early_stopping,
                                  ignore_eos=eos is None)
        (got,) = llm.beam_search(prompt, params)
        assert [b.token_ids for b in got.sequences] == [tokens for tokens, _ in want]
        for beam, (_, score) in zip(got.sequences, want):
            assert beam.score == pytest.approx(score, abs=1e-4)
            assert beam.score == pytest.approx(
                beam.cumulative_logprob / len(beam.token_ids) ** length_penalty)
    assert llm.engine.kv.num_used_blocks == 0


def test_beams_share_prefix_blocks(setup):
    _, llm = setup
    hits = llm.engine.kv.num_cache_hits
    llm.beam_search(list(range(10, 60)), BeamSearchParams(beam_width=4, max_tokens=6,
                                                          ignore_eos=True))
    # Each beam step reuses the prompt's 3 full blocks instead of recomputing them.
    assert llm.engine.kv.num_cache_hits - hits >= 5 * 4 * 48
