"""A word-level tokenizer for random-weight engines, so that text goes in and out of them.

Random weights make any text meaningless, but a server, a chat template, stop strings and
`kiln bench serving` need a tokenizer to run at all (vLLM and TensorRT-LLM benchmark with
one). Ids 0.. are common English words (one token each, so a prompt of N of them is N
tokens), the model's special ids are <s> / </s>, the rest are named w<id>; words it does
not know are <unk>. Decoding joins the words with spaces.
"""

from __future__ import annotations

import json
from pathlib import Path

# Common words: each is also one token in most BPE vocabularies, so `kiln bench serving`'s
# prompts of input_len such words are about input_len tokens on any model.
COMMON_WORDS = tuple(dict.fromkeys((
    "the of and to in is was for on are with as his they be at one have this from "
    "or had by word but what some we can out other were all there when up use your "
    "how said an each she which do their time if will way about many then them "
    "write would like so these her long make thing see him two has look more day "
    "could go come did number sound no most people my over know water than call "
    "first who may down side been now find any new work part take get place made "
    "live where after back little only round man year came show every good me give "
    "our under name very through just form great think say help low line differ "
    "turn cause much mean before move right boy old too same tell does set three "
    "want air well also play small end put home read hand port large spell add even "
    "land here must big high such follow act why ask men change went light kind off "
    "need house picture try us again animal point mother world near build self earth "
    "father head stand own page should country found answer school grow study still "
    "learn plant cover food sun four between state keep eye never last let thought "
    "city tree cross farm hard start might story saw far sea draw left late run").split()))


def write_word_tokenizer(dest: Path, vocab_size: int, bos_token_id: int | None,
                         eos_token_ids: tuple[int, ...]) -> None:
    """tokenizer.json + tokenizer_config.json covering ids 0..vocab_size-1."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    special = {i: "</s>" if n == 0 else f"</s{n}>" for n, i in enumerate(eos_token_ids)}
    if bos_token_id is not None:
        special[bos_token_id] = "<s>"
    names = list(COMMON_WORDS[:vocab_size])
    names += [f"w{i}" for i in range(len(names), vocab_size)]
    for i, name in special.items():
        if 0 <= i < vocab_size:
            names[i] = name
    names[max(i for i in range(vocab_size) if i not in special)] = "<unk>"  # the last plain id
    tok = Tokenizer(models.WordLevel({name: i for i, name in enumerate(names)},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(names[i], special=True)
                            for i in sorted(special) if 0 <= i < vocab_size])
    dest.mkdir(parents=True, exist_ok=True)
    tok.save(str(dest / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>",
              "bos_token": "<s>" if bos_token_id is not None else None,
              "eos_token": "</s>" if eos_token_ids else None,
              "chat_template": "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
                               "{% endfor %}{% if add_generation_prompt %}assistant : "
                               "{% endif %}"}
    (dest / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
