"""lm-evaluation-harness model `kiln`: any harness task on a kiln engine.

lm-eval finds models only in its own registry, so kiln's model is registered when this
module is imported. From the command line, run the harness through this module:

    python -m kiln.lm_eval_model --model kiln \\
        --model_args pretrained=engines/llama,quantization=fp8 --tasks hellaswag

(every `lm_eval` option works); from Python, `import kiln.lm_eval_model` before
`lm_eval.simple_evaluate(model="kiln", ...)`. `pretrained` is an engine dir, a HF folder or
a .gguf (None: the default model); other model_args are BuildConfig fields (dtype,
quantization, kv_cache_dtype, calib_file, ...), the limits max_seq_len / max_num_tokens
(max_batch_size is the harness's own option and sizes the engine too), and device.

Scores come from the batched engine: loglikelihoods from prompt logprobs
(`SamplingParams(prompt_logprobs=1)`), generations from greedy or sampled `generate`.
Requests are tokenized exactly as the harness's `hf` model does (TemplateLM), so the two
score the same token sequences.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import lm_eval.models  # noqa: F401  (registers the harness's own models first)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from kiln.config import BuildConfig
from kiln.errors import KilnError


class KilnLM(TemplateLM):
    """lm-eval's LM interface on `kiln.LLM`."""

    def __init__(self, pretrained: str | None = None, device: str | None = None,
                 batch_size: int | str | None = None, max_batch_size: int | None = None,
                 max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 prefix_token_id: int | None = None, **options: Any) -> None:
        super().__init__()
        from kiln.llm import LLM
        from kiln.runtime.engine import RuntimeConfig

        known = {f.name for f in dataclasses.fields(BuildConfig)} | \
            {f.name for f in dataclasses.fields(RuntimeConfig)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise KilnError(f"kiln lm-eval model: unknown model_args {', '.join(unknown)}")
        # batch_size is the harness's chunking; kiln's scheduler batches by its own limits.
        if max_batch_size:
            options["max_batch_size"] = int(max_batch_size)
        # The harness's default (cuda:0, set whether or not a GPU is there) picks like
        # kiln's own default; a device named in model_args is taken as given.
        device = "auto" if device in (None, "", "cuda", "cuda:0") else device
        self.llm = LLM(str(pretrained) if pretrained else None, device=device, **options)
        self.engine = self.llm.engine
        self.tokenizer = self.engine.tokenizer
        if self.tokenizer is None:
            raise KilnError("this engine has no tokenizer; lm-eval tasks need one")
        self.add_bos_token = add_bos_token
        self.max_gen_toks = int(max_gen_toks)
        self._prefix_token_id = prefix_token_id

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any],
                            additional_config: dict | None = None) -> KilnLM:
        """model_args first: the harness's own options (its --device and --batch_size,
        always set) fill in only what model_args leave out, where lm-eval's default
        would pass `device` twice."""
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str,
                               additional_config: dict | None = None) -> KilnLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string),
                                       additional_config)

    # ---- tokens -----------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else min(self.engine.eos_token_ids)

    @property
    def prefix_token_id(self) -> int:
        if self._prefix_token_id is not None:
            return int(self._prefix_token_id)
        bos = self.tokenizer.token_to_id(self.tokenizer.special["bos_token"])
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        # A scored sequence is max_length inputs + its last target, and the engine
        # generates one token after every prompt.
        return self.engine.max_seq_len - 2

    @functools.cached_property
    def _prefix_text(self) -> str:
        return self.tokenizer.decode([self.prefix_token_id], skip_special_tokens=False)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        if add_special_tokens is None:
            # A string that already starts with the prefix token's text (a chat template
            # that writes the BOS itself) gets no second one, as in the hf model.
            bos = self._prefix_text
            add_special_tokens = not (bos and string.startswith(bos)) and \
                (True if self.add_bos_token is None else self.add_bos_token)
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    @property
    def tokenizer_name(self) -> str:
        return str(self.llm.engine_dir).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """The chat rendered as the hf model renders it: without a generation prompt (a
        task's gen_prefix as the last, assistant message) the text ends right after that
        message, left open for the answer; a template that refuses a system message is
        given the chat without one."""
        from kiln.errors import RequestError

        def render(chat: list[dict[str, str]]) -> str:
            return self.tokenizer.apply_chat_template(
                chat, add_generation_prompt,
                continue_final_message=not add_generation_prompt and bool(chat))

        try:
            return render(chat_history)
        except RequestError:
            return render([m for m in chat_history if m.get("role") != "system"])

    # ---- scoring ----------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        """(sum of continuation logprobs, whether greedy decoding gives the continuation)
        for each (key, context ids, continuation ids), all in one batched generate."""
        from kiln.runtime.request import SamplingParams

        sequences = []
        for _, context, continuation in requests:
            # As the harness's hf model means to: max_length inputs + the last target, the
            # continuation whole and the context cut from the left (at least one token of
            # it left, for the first target's logprob).
            if len(continuation) > self.max_length:
                raise KilnError(
                    f"a continuation of {len(continuation)} tokens is longer than this "
                    f"engine can score (max_length {self.max_length}: max_seq_len "
                    f"{self.engine.max_seq_len} - 2); use an engine with a larger max_seq_len")
            keep = self.max_length + 1 - len(continuation)
            sequences.append(context[-keep:] + continuation)
        params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
        outputs = self.llm.generate(sequences, params, use_tqdm=not disable_tqdm)
        results = []
        for (key, _, continuation), ids, out in zip(requests, sequences, outputs):
            entries = out.prompt_logprobs[len(ids) - len(continuation):]
            total, greedy = 0.0, True
            for token, entry in zip(continuation, entries):
                logprob = entry[token]
                total += logprob
                greedy = greedy and logprob >= max(entry.values())
            results.append((total, greedy))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, (total, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, target in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, target))
                owners.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owners, self._loglikelihood_tokens(
                windows, disable_tqdm=disable_tqdm)):
            totals[index] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from kiln.runtime.request import SamplingParams

        eos = self.tok_decode([self.eot_token_id])
        prompts, params, stops = [], [], []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            # The context is cut to max_length - max_gen_toks tokens, as in the hf model.
            room = self.max_length - max_gen_toks
            if room < 1:
                raise KilnError(f"max_gen_toks ({max_gen_toks}) leaves no room for the "
                                f"context in max_length ({self.max_length}: max_seq_len "
                                f"{self.engine.max_seq_len} - 2)")
            temperature = float(kwargs.get("temperature") or 0.0) \
                if kwargs.get("do_sample") else 0.0
            prompts.append(self.tok_encode(context)[-room:])
            params.append(SamplingParams(
                max_tokens=max_gen_toks, temperature=temperature,
                top_p=float(kwargs.get("top_p") or 1.0), top_k=int(kwargs.get("top_k") or 0),
                seed=kwargs.get("seed"), stop=[s for s in until if s]))
            stops.append(until)
        outputs = self.llm.generate(prompts, params, use_tqdm=not disable_tqdm)
        results = []
        for req, out, until in zip(requests, outputs, stops):
            # Decode all tokens as the hf model does (out.text holds back a partial
            # character at the end), then cut at the first stop sequence.
            text = postprocess_generated_text(generation=self.tok_decode(out.token_ids),
                                              stop=until,
                                              think_end_token=None)
            results.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return results


def main() -> int:
    """`lm_eval` with kiln's model registered (python -m kiln.lm_eval_model ...)."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    try:
        result = cli_evaluate()
    except KilnError as e:  # a user's mistake (an engine, a model_arg): one line
        print(f"kiln: error: {e}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    import sys

    import kiln.lm_eval_model  # registers `kiln` under the module's importable name

    sys.exit(kiln.lm_eval_model.main())
else:
    register_model("kiln")(KilnLM)
