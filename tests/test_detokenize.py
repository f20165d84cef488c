"""Incremental detokenization (byte-level BPE, SentencePiece) and stop strings."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import pytest

from kiln import LLM, SamplingParams
from kiln.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = ["Hello, world! 你好世界 🎉🎉 naïve café",
         "  leading spaces\tand\ttabs\n\nnew lines", "日本語のテキストです。",
         "emoji mix: 👩‍👩‍👧 family, 🇫🇷 flag",
         "x = [i**2 for i in range(10)]"]


def streamed_text(tokenizer: Tokenizer, prompt: list[int], output: list[int],
                  skip_special_tokens: bool = True) -> str:
    """What streaming `output` after `prompt` must give: the text of the whole past the
    prompt's own text, where a prompt that ends inside a character (its text ends with
    U+FFFD) leaves that character to the output."""
    full = tokenizer.decode(prompt + output, skip_special_tokens)
    before = tokenizer.decode(prompt, skip_special_tokens)
    return full[len(os.path.commonprefix([before, full])):]


def check_incremental(tokenizer: Tokenizer, text: str) -> None:
    """Every split of the text's tokens into prompt and output (some inside a character:
    a prompt of token ids can end anywhere)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    for split in range(1, len(ids)):
        prompt, output = ids[:split], ids[split:]
        detok = IncrementalDetokenizer(tokenizer, prompt)
        deltas = [detok.add(t) for t in output]
        assert not any("\ufffd" in d for d in deltas), split  # never half a character
        assert "".join(deltas) == streamed_text(tokenizer, prompt, output), split
    assert streamed_text(tokenizer, ids[:2], ids[2:]) == \
        tokenizer.decode(ids)[len(tokenizer.decode(ids[:2])):]  # a whole-character split


def test_prompt_ending_inside_a_character(smollm2_tokenizer):
    """A prompt of token ids that stops inside a character: the output's first token
    completes it, and the stream gives that character (it once dropped one)."""
    tok = smollm2_tokenizer
    ids, more = tok.encode("世界🤖", add_special_tokens=False), tok.encode("🤖 ok")
    prompt, output = ids[:-1], ids[-1:] + more
    assert tok.decode(prompt).endswith("\ufffd")
    for stream in (True, False):
        detok = IncrementalDetokenizer(tok, prompt)
        if not stream:
            detok._stream = None
        assert "".join(detok.add(t) for t in output) == "🤖🤖 ok"


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_engine) -> Tokenizer:
    return Tokenizer.from_engine(smollm2_engine)


@pytest.mark.parametrize("text", TEXTS)
def test_byte_level_bpe_incremental(smollm2_tokenizer, text):
    check_incremental(smollm2_tokenizer, text)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_decode_stream_gives_the_decodes_deltas(smollm2_tokenizer, skip_special_tokens):
    """The detokenizer's `tokenizers` DecodeStream path gives, token by token, the deltas
    of its own two-decode path: random token ids (partial UTF-8, special tokens) after
    text prompts (the stream primed) and after random prompts (some ending inside a
    character, where the stream is not used)."""
    import random

    tok, rng = smollm2_tokenizer, random.Random(0)
    streamed = 0
    for trial in range(300):
        prompt = tok.encode(TEXTS[trial % len(TEXTS)]) if trial % 2 else \
            [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 9))]
        output = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        fast = IncrementalDetokenizer(tok, prompt, skip_special_tokens)
        plain = IncrementalDetokenizer(tok, prompt, skip_special_tokens)
        plain._stream = None
        streamed += fast._stream is not None
        assert [fast.add(t) for t in output] == [plain.add(t) for t in output], trial
        assert fast.text == plain.text
        # All of the output's text, less what waits for the rest of a character.
        want = streamed_text(tok, prompt, output, skip_special_tokens)
        assert want.startswith(fast.text), trial
        assert want == fast.text or want.endswith("\ufffd"), trial
    assert streamed >= 150  # every text prompt, most random ones


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory) -> Path:
    """botchan_en_bpe_1000.model (a BPE SentencePiece model) from the sentencepiece sdist."""
    from tests.test_smollm2 import botchan_text

    botchan_text()  # downloads the sdist into the cache
    sdist = sorted((Path.home() / ".cache" / "kiln" / "data").glob("sentencepiece-*.tar.gz"))[-1]
    path = tmp_path_factory.mktemp("spm") / "sp.model"
    with tarfile.open(sdist) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("botchan_en_bpe_1000.model"))
        path.write_bytes(tar.extractfile(member).read())
    return path


@pytest.fixture(scope="module")
def sentencepiece_tokenizer(sentencepiece_model) -> Tokenizer:
    from kiln.checkpoint.sentencepiece import convert_sentencepiece

    folder = sentencepiece_model.parent / "converted"
    assert convert_sentencepiece(sentencepiece_model, folder, write_config=True)
    return Tokenizer(folder)


SP_TEXTS = ["I am a cat. As yet I have no name.", "two spaces and three",
            "Botchan's café, naïve!", "The 1906 novel, chapter 11."]


@pytest.mark.parametrize("text", SP_TEXTS)
def test_sentencepiece_conversion_matches_sentencepiece(sentencepiece_model,
                                                        sentencepiece_tokenizer, text):
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(sentencepiece_model))
    want = [sp.bos_id(), *sp.encode(text)]
    got = sentencepiece_tokenizer.encode(text)
    assert len(got) > 3 and got == want
    if sp.unk_id() not in want:  # sentencepiece spells <unk> as " ⁇ "; we skip it
        assert sentencepiece_tokenizer.decode(got) == sp.decode(want)


@pytest.mark.parametrize("text", SP_TEXTS)
def test_sentencepiece_incremental(sentencepiece_tokenizer, text):
    check_incremental(sentencepiece_tokenizer, text)


def test_stop_string_across_tokens(smollm2_engine):
    llm = LLM(smollm2_engine, device="cpu")
    prompt = "The capital of France is"
    free = llm.generate(prompt, SamplingParams(max_tokens=20, temperature=0))[0]
    text = free.text
    # A stop string starting in the middle of one token and ending in another.
    stop = text[len(text) // 2 - 2: len(text) // 2 + 3]
    out = llm.generate(prompt, SamplingParams(max_tokens=20, temperature=0, stop=[stop]))[0]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop
    assert out.text == text[:text.index(stop)]
    kept = llm.generate(prompt, SamplingParams(max_tokens=20, temperature=0, stop=[stop],
                                               include_stop_str_in_output=True))[0]
    assert kept.text == text[:text.index(stop) + len(stop)]


def test_stream_yields_the_same_text(smollm2_engine):
    llm = LLM(smollm2_engine, device="cpu")
    params = SamplingParams(max_tokens=16, temperature=0)
    pieces = list(llm.engine.stream("Once upon a time", params))
    assert len(pieces) > 3
    assert "".join(pieces) == llm.generate("Once upon a time", params)[0].text
    assert llm.engine.kv.num_used_blocks == 0


def test_chat_template_applies(smollm2_engine):
    llm = LLM(smollm2_engine, device="cpu")
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=16, temperature=0))[0]
    assert "Paris" in out.text


def test_chat_takes_openai_content_parts(smollm2_engine):
    """LLM.chat with OpenAI-style messages: text parts joined as the server joins them,
    None content as empty; other parts and malformed messages are a RequestError."""
    from kiln.errors import RequestError

    tok = LLM(smollm2_engine, device="cpu").tokenizer
    plain = tok.apply_chat_template([{"role": "user", "content": "Hi\nthere"}])
    parts = [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]
    assert tok.apply_chat_template([{"role": "user", "content": parts}]) == plain
    assert tok.apply_chat_template([{"role": "user", "content": None}]) == \
        tok.apply_chat_template([{"role": "user", "content": ""}])
    for bad, words in (([{"role": "user", "content": [{"type": "image_url"}]}], "text parts"),
                       ([{"content": "Hi"}], "messages[0]"), (["Hi"], "messages[0]")):
        with pytest.raises(RequestError, match=words.replace("[", r"\[")):
            tok.apply_chat_template(bad)


def test_hf_folder_with_only_a_sentencepiece_model(sentencepiece_model,
                                                   sentencepiece_tokenizer, tmp_path):
    """Older checkpoints ship tokenizer.model only: the build converts it to tokenizer.json."""
    import json
    import shutil

    from kiln.build import build
    from kiln.config import BuildConfig
    from tests.conftest import make_hf_model

    folder = tmp_path / "hf"
    # vocab_size as the tokenizer's 1000 pieces: a smaller one is refused at build time.
    make_hf_model("llama", folder, configs={"llama": ("LlamaConfig", dict(vocab_size=1000))})
    shutil.copy(sentencepiece_model, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    engine = build(folder, tmp_path / "engine", BuildConfig(dtype="float32", max_seq_len=64),
                   progress=False)
    converted = Tokenizer.from_engine(engine)
    text = "I am a cat. As yet I have no name."
    # No add_bos_token there: no BOS, as transformers 5 (tests/test_tokenizer_qa45.py).
    assert converted.encode(text) == sentencepiece_tokenizer.encode(text,
                                                                     add_special_tokens=False)
