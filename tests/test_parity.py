"""kiln vs HuggingFace transformers on tiny random models of every architecture (float32)."""

from __future__ import annotations

import pytest
import torch

from kiln import LLM, SamplingParams
from tests.conftest import ARCH_CONFIGS

PROMPTS = [[5, 17, 99, 3, 42], [7] * 11 + [200, 13], [250, 1, 8], list(range(30, 70))]
NEW_TOKENS = 32


def hf_greedy(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits that chose each of them."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             output_logits=True, return_dict_in_generate=True,
                             pad_token_id=0, eos_token_id=None)
    return out.sequences[0, len(prompt):].tolist(), torch.cat(out.logits, 0)


@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
def test_greedy_tokens_and_logits_match_transformers(arch, tiny_checkpoints, tiny_engines):
    _, hf_model = tiny_checkpoints[arch]
    llm = LLM(tiny_engines[arch], device="cpu")
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True,
                            logprobs=0)
    # All prompts of different lengths in one batch.
    outputs = llm.generate(PROMPTS, params)
    for prompt, out in zip(PROMPTS, outputs):
        want_tokens, want_logits = hf_greedy(hf_model, prompt, NEW_TOKENS)
        assert out.token_ids == want_tokens
        assert out.finish_reason == "length"
        want_lp = torch.log_softmax(want_logits.float(), -1)
        got_lp = torch.tensor([next(iter(step.values())) for step in out.outputs[0].logprobs])
        chosen = want_lp.gather(1, torch.tensor(want_tokens)[:, None])[:, 0]
        assert (got_lp - chosen).abs().max() < 1e-4


@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
def test_prefill_logits_match_transformers(arch, tiny_checkpoints, tiny_engines):
    from kiln.eval import sequence_logits

    _, hf_model = tiny_checkpoints[arch]
    llm = LLM(tiny_engines[arch], device="cpu")
    tokens = list(range(3, 120))
    with torch.no_grad():
        want = hf_model(torch.tensor([tokens])).logits[0]
    got = sequence_logits(llm.engine, tokens)
    assert got.shape == want.shape
    assert (got - want).abs().max() < 1e-4
