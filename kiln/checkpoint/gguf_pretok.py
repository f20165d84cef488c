"""How a GGUF's byte-level BPE tokenizer splits text into words: tokenizer.ggml.pre.

llama.cpp's converter names the pre-tokenizer of the HF tokenizer.json it converted
(convert_hf_to_gguf.py recognises each by its output on a test text); llama.cpp then runs
a fixed chain of split regexes for each name (llama-vocab.cpp). Each entry here is that
chain, written as HF tokenizers runs it: every regex splits each piece again, keeping the
matches and the text between them as pieces ("isolated"), then the bytes are mapped
GPT-2's way. A name that is not here is refused: a guessed split gives other token ids.

Where llama.cpp's chain is its own regex engine's approximation of the tokenizer.json
pattern (tekken), the tokenizer.json pattern is used, since HF tokenizers (kiln's runtime)
reads it as the model's trainers did.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PreTokenizer:
    splits: tuple[str, ...]  # regexes, in order, each splitting every piece (isolated)
    gpt2: bool  # then GPT-2's own word regex (ByteLevel's)
    ignore_merges: bool = False  # a whole word found in the vocab is one token
    add_bos: bool = False  # llama.cpp's add_bos_token where the file does not say


def _chars(ranges: tuple[tuple[int, int], ...]) -> str:
    """A regex character class body from code point ranges (written as code points so no
    editor or normalizer can fold a range end into a look-alike character)."""
    return "".join(chr(lo) if lo == hi else f"{chr(lo)}-{chr(hi)}" for lo, hi in ranges)


_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's split is llama3's with single digits.
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
# Mistral's tekken (Mistral NeMo, Pixtral, Mistral Small 3.x): words split at case changes.
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek LLM / Coder (tokenizer.json: a chain of Splits, then single digits).
_CJK = _chars(((0x4E00, 0x9FA5), (0x0800, 0x4E00), (0xAC00, 0xD7FF)))
_DEEPSEEK_PUNCT = _chars(((0x21, 0x2F), (0x3A, 0x7E), (0xFF01, 0xFF0F), (0xFF1A, 0xFF5E),
                          (0x2018, 0x201F), (0x3000, 0x3002)))
# The cased letters of DeepSeek LLM's letter split.
_DEEPSEEK_LETTERS = _chars((
    (0x41, 0x5A), (0x61, 0x7A), (0xB5, 0xB5), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x1BA),
    (0x1BC, 0x1BF), (0x1C4, 0x293), (0x295, 0x2AF), (0x370, 0x373), (0x376, 0x377),
    (0x37B, 0x37D), (0x37F, 0x37F), (0x386, 0x386), (0x388, 0x38A), (0x38C, 0x38C),
    (0x38E, 0x3A1), (0x3A3, 0x3F5), (0x3F7, 0x481), (0x48A, 0x52F), (0x531, 0x556),
    (0x10A0, 0x10C5), (0x13A0, 0x13F5), (0x13F8, 0x13FD), (0x1C90, 0x1CBA),
    (0x1CBD, 0x1CBF), (0x1D00, 0x1D2B), (0x1D6B, 0x1D77), (0x1D79, 0x1D9A),
    (0x1E00, 0x1F15), (0x1F18, 0x1F1D), (0x1F20, 0x1F45), (0x1F48, 0x1F4D),
    (0x1F50, 0x1F57), (0x1F59, 0x1F59), (0x1F5B, 0x1F5B), (0x1F5D, 0x1F5D),
    (0x1F5F, 0x1F7D), (0x1F80, 0x1FB4), (0x1FB6, 0x1FBC), (0x1FBE, 0x1FBE),
    (0x1FC2, 0x1FC4), (0x1FC6, 0x1FCC), (0x1FD0, 0x1FD3), (0x1FD6, 0x1FDB),
    (0x1FE0, 0x1FEC), (0x1FF2, 0x1FF4), (0x1FF6, 0x1FFC), (0x2102, 0x2102),
    (0x2107, 0x2107), (0x210A, 0x2113), (0x2115, 0x2115), (0x2119, 0x211D),
    (0x2124, 0x2124), (0x2126, 0x2126), (0x2128, 0x2128), (0x212A, 0x212D),
    (0x212F, 0x2134), (0x2139, 0x2139), (0x213C, 0x213F), (0x2145, 0x2149),
    (0x214E, 0x214E), (0x2183, 0x2184), (0x2C00, 0x2C7B), (0x2C7E, 0x2CE4),
    (0x2CEB, 0x2CEE), (0x2CF2, 0x2CF3), (0xA640, 0xA66D), (0xA680, 0xA69B),
    (0xA722, 0xA76F), (0xA771, 0xA787), (0xA78B, 0xA78E), (0xAB70, 0xABBF),
    (0xFB00, 0xFB06), (0xFB13, 0xFB17), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A),
    (0x10400, 0x1044F), (0x104B0, 0x104D3), (0x104D8, 0x104FB), (0x10C80, 0x10CB2),
    (0x10CC0, 0x10CF2), (0x118A0, 0x118DF), (0x1E900, 0x1E943)))

GPT2 = PreTokenizer((), True)
_DIGITS_GPT2 = PreTokenizer((r"\p{N}",), True)  # every digit alone, then GPT-2's words
_LLAMA3_BPE = PreTokenizer((_LLAMA3,), False, ignore_merges=True, add_bos=True)
_LLAMA3_SPLIT = PreTokenizer((_LLAMA3,), False)  # llama3's regex, merges as usual
_QWEN2_BPE = PreTokenizer((_QWEN2,), False)
_TEKKEN_BPE = PreTokenizer((_TEKKEN,), False, ignore_merges=True, add_bos=True)
_DEEPSEEK_LLM = PreTokenizer((r"[\r\n]", rf"\s?[{_DEEPSEEK_LETTERS}]+",
                              rf"\s?[{_DEEPSEEK_PUNCT}]+", r"\s+$", f"[{_CJK}]+",
                              r"\p{N}+"), False)
_DEEPSEEK_CODER = PreTokenizer((r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", f"[{_CJK}]+",
                                r"\p{N}"), False)

# tokenizer.ggml.pre -> its split, grouped as llama.cpp groups the names. "default" (also
# a file without the key: old converters) is taken as GPT-2's split, with a warning.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    **dict.fromkeys(("default", "gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion",
                     "gigachat", "exaone4", "a.x-4.0", "mellum"), GPT2),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b"), _DIGITS_GPT2),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "midm-2.0",
                     "lfm2"), _LLAMA3_BPE),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan"),
                    _QWEN2_BPE),
    # llama.cpp splits "pixtral" as llama3, after the pattern its tokenizer.json carried;
    # Mistral has since said that pattern was wrong (transformers' fix_mistral_regex puts
    # tekken's back), so the model's own split is used.
    **dict.fromkeys(("tekken", "pixtral"), _TEKKEN_BPE),
    "deepseek-llm": _DEEPSEEK_LLM,
    "deepseek-coder": _DEEPSEEK_CODER,
}
