"""The tensor contract of TensorRT-LLM's Triton backend (`inflight_batcher_llm`), as kiln
serves it: the token-level `tensorrt_llm` model, the `preprocessing` (text -> ids) and
`postprocessing` (ids -> text) models, and the `ensemble` that chains them, so that
clients written for a TensorRT-LLM deployment send the same requests to kiln.

Names, data types and dims follow the backend's documented model configs. kiln declares
the subset it implements; an input outside it (LoRA, draft tokens, prompt tables,
images, ...) is refused by Triton itself as unknown, never silently ignored. All four
models batch (max_batch_size > 0), so every tensor has a leading batch dim of 1 from
the client; the dims below exclude it, as config.pbtxt does.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # Triton config type, e.g. TYPE_INT32
    dims: tuple[int, ...]
    optional: bool = False
    scalar: bool = False  # dims [1] reshaped to [] inside the model, as TensorRT-LLM does
    ragged: bool = False  # allow_ragged_batch

    def pbtxt(self) -> str:
        parts = [f'name: "{self.name}"', f"data_type: {self.data_type}",
                 f"dims: [ {', '.join(str(d) for d in self.dims)} ]"]
        if self.scalar:
            parts.append("reshape: { shape: [ ] }")
        if self.ragged:
            parts.append("allow_ragged_batch: true")
        if self.optional:
            parts.append("optional: true")
        return "  { " + " ".join(parts) + " }"


def _opt(name: str, data_type: str) -> TensorSpec:
    return TensorSpec(name, data_type, (1,), optional=True, scalar=True)


TENSORRT_LLM_INPUTS = (
    TensorSpec("input_ids", "TYPE_INT32", (-1,), ragged=True),
    TensorSpec("input_lengths", "TYPE_INT32", (1,), scalar=True),
    TensorSpec("request_output_len", "TYPE_INT32", (1,), scalar=True),
    _opt("end_id", "TYPE_INT32"), _opt("pad_id", "TYPE_INT32"),
    TensorSpec("stop_words_list", "TYPE_INT32", (2, -1), optional=True, ragged=True),
    TensorSpec("bad_words_list", "TYPE_INT32", (2, -1), optional=True, ragged=True),
    _opt("beam_width", "TYPE_INT32"), _opt("num_return_sequences", "TYPE_INT32"),
    _opt("temperature", "TYPE_FP32"), _opt("runtime_top_k", "TYPE_INT32"),
    _opt("runtime_top_p", "TYPE_FP32"), _opt("repetition_penalty", "TYPE_FP32"),
    _opt("min_tokens", "TYPE_INT32"), _opt("presence_penalty", "TYPE_FP32"),
    _opt("frequency_penalty", "TYPE_FP32"),
    _opt("seed", "TYPE_UINT64"), _opt("random_seed", "TYPE_UINT64"),  # new and old name
    _opt("return_log_probs", "TYPE_BOOL"), _opt("exclude_input_in_output", "TYPE_BOOL"),
    _opt("streaming", "TYPE_BOOL"),
)
TENSORRT_LLM_OUTPUTS = (
    TensorSpec("output_ids", "TYPE_INT32", (-1, -1)),  # [beam, tokens]
    TensorSpec("sequence_length", "TYPE_INT32", (-1,)),  # [beam]
    TensorSpec("cum_log_probs", "TYPE_FP32", (-1,)),
    TensorSpec("output_log_probs", "TYPE_FP32", (-1, -1)),
)

PREPROCESSING_INPUTS = (
    TensorSpec("QUERY", "TYPE_STRING", (1,)),
    TensorSpec("REQUEST_OUTPUT_LEN", "TYPE_INT32", (1,)),
    TensorSpec("BAD_WORDS_DICT", "TYPE_STRING", (-1,), optional=True),
    TensorSpec("STOP_WORDS_DICT", "TYPE_STRING", (-1,), optional=True),
    TensorSpec("END_ID", "TYPE_INT32", (1,), optional=True),
    TensorSpec("PAD_ID", "TYPE_INT32", (1,), optional=True),
)
PREPROCESSING_OUTPUTS = (
    TensorSpec("INPUT_ID", "TYPE_INT32", (-1,)),
    TensorSpec("REQUEST_INPUT_LEN", "TYPE_INT32", (1,)),
    TensorSpec("BAD_WORDS_IDS", "TYPE_INT32", (2, -1)),
    TensorSpec("STOP_WORDS_IDS", "TYPE_INT32", (2, -1)),
    TensorSpec("REQUEST_OUTPUT_LEN", "TYPE_INT32", (-1,)),
    TensorSpec("OUT_END_ID", "TYPE_INT32", (1,)),
    TensorSpec("OUT_PAD_ID", "TYPE_INT32", (1,)),
)

POSTPROCESSING_INPUTS = (
    TensorSpec("TOKENS_BATCH", "TYPE_INT32", (-1, -1)),
    TensorSpec("SEQUENCE_LENGTH", "TYPE_INT32", (-1,)),
)
POSTPROCESSING_OUTPUTS = (TensorSpec("OUTPUT", "TYPE_STRING", (-1,)),)

# ensemble input -> the input of the step that takes it (preprocessing or tensorrt_llm)
ENSEMBLE_INPUTS = (
    (TensorSpec("text_input", "TYPE_STRING", (1,)), "preprocessing", "QUERY"),
    (TensorSpec("max_tokens", "TYPE_INT32", (1,)), "preprocessing", "REQUEST_OUTPUT_LEN"),
    (TensorSpec("bad_words", "TYPE_STRING", (-1,), optional=True), "preprocessing",
     "BAD_WORDS_DICT"),
    (TensorSpec("stop_words", "TYPE_STRING", (-1,), optional=True), "preprocessing",
     "STOP_WORDS_DICT"),
    (TensorSpec("end_id", "TYPE_INT32", (1,), optional=True), "preprocessing", "END_ID"),
    (TensorSpec("pad_id", "TYPE_INT32", (1,), optional=True), "preprocessing", "PAD_ID"),
    *((TensorSpec(name, dtype, (1,), optional=True), "tensorrt_llm", target) for name, dtype,
      target in (("exclude_input_in_output", "TYPE_BOOL", "exclude_input_in_output"),
                 ("top_k", "TYPE_INT32", "runtime_top_k"),
                 ("top_p", "TYPE_FP32", "runtime_top_p"),
                 ("temperature", "TYPE_FP32", "temperature"),
                 ("repetition_penalty", "TYPE_FP32", "repetition_penalty"),
                 ("min_tokens", "TYPE_INT32", "min_tokens"),
                 ("presence_penalty", "TYPE_FP32", "presence_penalty"),
                 ("frequency_penalty", "TYPE_FP32", "frequency_penalty"),
                 ("seed", "TYPE_UINT64", "seed"),
                 ("random_seed", "TYPE_UINT64", "random_seed"),
                 ("return_log_probs", "TYPE_BOOL", "return_log_probs"),
                 ("beam_width", "TYPE_INT32", "beam_width"),
                 ("num_return_sequences", "TYPE_INT32", "num_return_sequences"),
                 ("stream", "TYPE_BOOL", "streaming"))),
)
ENSEMBLE_OUTPUTS = (
    TensorSpec("text_output", "TYPE_STRING", (-1,)),
    TensorSpec("cum_log_probs", "TYPE_FP32", (-1,)),
    TensorSpec("output_log_probs", "TYPE_FP32", (-1, -1)),
)
# preprocessing output -> tensorrt_llm input, and tensorrt_llm -> postprocessing
_PRE_TO_LLM = {"INPUT_ID": "input_ids", "REQUEST_INPUT_LEN": "input_lengths",
               "REQUEST_OUTPUT_LEN": "request_output_len", "STOP_WORDS_IDS": "stop_words_list",
               "BAD_WORDS_IDS": "bad_words_list", "OUT_END_ID": "end_id",
               "OUT_PAD_ID": "pad_id"}
_LLM_TO_POST = {"output_ids": "TOKENS_BATCH", "sequence_length": "SEQUENCE_LENGTH"}


def _io(inputs, outputs) -> str:
    return ("input [\n" + ",\n".join(t.pbtxt() for t in inputs) + "\n]\noutput [\n"
            + ",\n".join(t.pbtxt() for t in outputs) + "\n]\n")


def _params(params: dict[str, str]) -> str:
    return "".join(f'parameters: {{ key: "{k}" value: {{ string_value: "{v}" }} }}\n'
                   for k, v in params.items())


def python_model_config(name: str, inputs, outputs, max_batch_size: int, decoupled: bool,
                        params: dict[str, str]) -> str:
    policy = "model_transaction_policy { decoupled: true }\n" if decoupled else ""
    return (f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch_size}\n{policy}'
            + _io(inputs, outputs)
            + "instance_group [ { count: 1 kind: KIND_CPU } ]\n" + _params(params))


def ensemble_config(max_batch_size: int) -> str:
    def maps(kind: str, pairs) -> str:
        return "".join(f'      {kind} {{ key: "{k}" value: "{v}" }}\n' for k, v in pairs)

    pre_in = [(target, spec.name) for spec, step, target in ENSEMBLE_INPUTS
              if step == "preprocessing"]
    llm_in = [(target, spec.name) for spec, step, target in ENSEMBLE_INPUTS
              if step == "tensorrt_llm"]
    llm_in += [(llm, f"_{pre}") for pre, llm in _PRE_TO_LLM.items()]
    steps = [("preprocessing", pre_in, [(pre, f"_{pre}") for pre in _PRE_TO_LLM]),
             ("tensorrt_llm", llm_in,
              [(out, f"_{out}") for out in _LLM_TO_POST]
              + [("cum_log_probs", "cum_log_probs"), ("output_log_probs", "output_log_probs")]),
             ("postprocessing", [(post, f"_{out}") for out, post in _LLM_TO_POST.items()],
              [("OUTPUT", "text_output")])]
    body = ",\n".join(f'    {{\n      model_name: "{model}"\n      model_version: -1\n'
                      + maps("input_map", ins) + maps("output_map", outs) + "    }"
                      for model, ins, outs in steps)
    return (f'name: "ensemble"\nplatform: "ensemble"\nmax_batch_size: {max_batch_size}\n'
            + _io([spec for spec, _, _ in ENSEMBLE_INPUTS], ENSEMBLE_OUTPUTS)
            + "ensemble_scheduling {\n  step [\n" + body + "\n  ]\n}\n")
