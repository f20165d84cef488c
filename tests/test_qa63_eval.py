"""QA of the lm-eval adapter (kiln.lm_eval_model) against the harness's own `hf` model on a
tiny random Llama whose tokenizer merges across the context / continuation boundary, adds a
BOS itself and has a chat template: the same scores, texts and prompts, in request order."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>\n"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
NO_SYSTEM = ("{% if messages[0].role == 'system' %}{{ raise_exception('no system role') }}"
             "{% endif %}" + TEMPLATE)
MERGES = [("t", "h"), ("th", "e"), ("Ġ", "c"), ("Ġc", "a"), ("Ġca", "t"), ("Ġ", "the"),
          ("a", "t"), ("Ġ", "s"), ("Ġs", "at"), ("Ġ", "d"), ("Ġd", "o"), ("Ġdo", "g")]


def tiny_bpe_model(folder: Path) -> Path:
    """A tiny random Llama; byte-level BPE with a few merges (" cat" is one token, "the c"
    + "at" is not), a post-processor that prepends <s>, and a chat template."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    bos = len(vocab)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=bos + 2, max_position_embeddings=512,
        initializer_range=0.2, rms_norm_eps=1e-6, bos_token_id=bos, eos_token_id=bos + 1,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32) \
        .save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(KilnLM, the harness's HFLM) on the same weights and the same max_length (62)."""
    from lm_eval.models.huggingface import HFLM

    from kiln.build import build
    from kiln.config import BuildConfig
    from kiln.lm_eval_model import KilnLM

    folder = tiny_bpe_model(tmp_path_factory.mktemp("qa63_bpe") / "model")
    engine = build(folder, tmp_path_factory.mktemp("qa63_bpe_engine") / "engine",
                   BuildConfig(dtype="float32", max_seq_len=64, max_batch_size=8),
                   progress=False)
    ours = KilnLM(pretrained=str(engine), device="cpu")
    theirs = HFLM(pretrained=str(folder), dtype="float32", device="cpu",
                  max_length=ours.max_length, batch_size=3)
    assert ours.max_length == theirs.max_length == 62
    return ours, theirs


def _instances(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def _same_loglikelihoods(ours, theirs, pairs) -> None:
    requests = _instances("loglikelihood", pairs)
    got, want = ours.loglikelihood(requests, True), theirs.loglikelihood(requests, True)
    assert [g for _, g in got] == [g for _, g in want]
    assert [s for s, _ in got] == pytest.approx([s for s, _ in want], abs=1e-4)


def test_context_that_starts_with_bos_gets_no_second_one(models):
    """A context already holding the BOS text (a chat template writes it) was encoded with
    a second BOS in front (<s><s>...), so its scores differed from the hf model's."""
    ours, theirs = models
    bos = ours.prefix_token_id
    assert ours.tok_encode("the cat") == theirs.tok_encode("the cat") == [bos, 257, 260]
    assert ours.tok_encode("<s>the cat") == theirs.tok_encode("<s>the cat") == [bos, 257, 260]
    assert ours.tok_encode("<s>the", add_special_tokens=True)[:2] == [bos, bos]  # as asked
    _same_loglikelihoods(ours, theirs, [("<s>the c", "at sat"), ("<s><|user|>\nthe", " dog")])


def test_chat_template_leaves_the_gen_prefix_open(models, monkeypatch):
    """With a task's gen_prefix the harness asks for no generation prompt, the prefix the
    last (assistant) message: the hf model renders the chat up to the prefix and leaves the
    turn open for the answer; kiln closed the turn (`Answer:</s>\\n`), so every choice was
    scored after an end of turn. A template that refuses a system message is retried
    without it, as the hf model does (kiln raised)."""
    ours, theirs = models
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"},
            {"role": "assistant", "content": "Answer: "}]
    for template in (TEMPLATE, NO_SYSTEM):
        monkeypatch.setattr(ours.tokenizer, "chat_template", template)
        monkeypatch.setattr(theirs.tokenizer, "chat_template", template)
        for content in ("Answer: ", "Answer:"):
            full = [*chat[:2], {"role": "assistant", "content": content}]
            for history, prompt in ((full, False), (full[:2], True), (full[:2], False)):
                got = ours.apply_chat_template([dict(m) for m in history], prompt)
                assert got == theirs.apply_chat_template([dict(m) for m in history], prompt)
    monkeypatch.setattr(ours.tokenizer, "chat_template", TEMPLATE)
    assert ours.apply_chat_template(chat, False).endswith("<|assistant|>\nAnswer: ")


def test_generate_until_cuts_the_context_as_hf(models):
    """A context longer than max_length - max_gen_toks is cut from the left to that many
    tokens, as the hf model cuts it (kiln kept max_seq_len - max_gen_toks: 2 more, so a
    different prompt and different text)."""
    ours, theirs = models
    requests = _instances("generate_until", [
        ("x" * 70, {"until": ["at"], "max_gen_toks": 20}),
        ("the cat sat " * 12, {"until": ["\n"], "max_gen_toks": 8, "do_sample": False})])
    assert ours.generate_until(requests, True) == theirs.generate_until(requests, True)
    from kiln.errors import KilnError

    with pytest.raises(KilnError, match=r"max_gen_toks \(62\) leaves no room"):
        ours.generate_until(_instances("generate_until", [("the", {"max_gen_toks": 62})]),
                            True)


def test_scores_and_texts_equal_hf_in_request_order(models):
    """Many requests of mixed lengths (more than a batch), boundaries inside a token, empty
    contexts, trailing spaces, contexts past max_length, rolling windows: the same numbers
    and texts as the hf model, each at its request's place."""
    ours, theirs = models
    rng = random.Random(0)
    words = ["the", "cat", "sat", "dog", "x", "the cat"]

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    pairs = [(text(rng.randint(1, 30)), " " + text(rng.randint(1, 6))) for _ in range(20)]
    pairs += [("the c", "at sat"), ("", "the cat"), ("the cat ", "sat"), ("a" * 80, "b"),
              ("the", " the cat sat" * 5)]
    _same_loglikelihoods(ours, theirs, pairs)
    rolling = _instances("loglikelihood_rolling", [
        ("the cat sat on the dog. " * 12,), ("hi",), ("the cat",)])
    assert ours.loglikelihood_rolling(rolling, True) == \
        pytest.approx(theirs.loglikelihood_rolling(rolling, True), rel=1e-5)
    gen = _instances("generate_until", [
        (c, {"until": ["g"], "max_gen_toks": rng.randint(1, 12)}) for c, _ in pairs[:12]])
    assert ours.generate_until(gen, True) == theirs.generate_until(gen, True)
