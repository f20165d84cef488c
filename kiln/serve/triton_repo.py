"""`kiln triton-repo`: write a Triton Inference Server model repository for an engine.

    <out>/<model_name>/config.pbtxt      python backend, decoupled, generate-style inputs
    <out>/<model_name>/1/model.py        kiln.serve.triton_model, copied
    <out>/<model_name>/1/engine/         the engine dir, with --copy-engine

With --tensorrt-llm, TensorRT-LLM's inflight_batcher_llm layout instead (see
trtllm_contract): <out>/{preprocessing,tensorrt_llm,postprocessing,ensemble}/.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from kiln.build.engine_dir import load_engine_config
from kiln.errors import KilnError
from kiln.serve.generate_params import INPUTS, OUTPUTS

_TRITON_TYPES = {"BYTES": "TYPE_STRING", "INT32": "TYPE_INT32", "UINT64": "TYPE_UINT64",
                 "FP32": "TYPE_FP32", "BOOL": "TYPE_BOOL"}


def _tensor(name: str, datatype: str, shape: list[int], optional: bool) -> str:
    dims = ", ".join(str(d) for d in shape)
    extra = " optional: true" if optional else ""
    return (f'  {{ name: "{name}" data_type: {_TRITON_TYPES[datatype]} '
            f"dims: [ {dims} ]{extra} }}")


def config_pbtxt(model_name: str, engine_dir: str, device: str) -> str:
    inputs = ",\n".join(_tensor(n, d, s, n != "text_input") for n, d, s in INPUTS)
    outputs = ",\n".join(_tensor(n, d, s, False) for n, d, s in OUTPUTS)
    # max_batch_size 0: Triton does no batching of its own, kiln batches continuously.
    # KIND_MODEL: kiln picks its device itself (`device` below) instead of Triton.
    return f"""name: "{model_name}"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [
{inputs}
]
output [
{outputs}
]
instance_group [ {{ count: 1 kind: KIND_MODEL }} ]
parameters: {{ key: "engine_dir" value: {{ string_value: "{engine_dir}" }} }}
parameters: {{ key: "device" value: {{ string_value: "{device}" }} }}
"""


_TRTLLM_MAX_BATCH = 64  # Triton's limit per request; kiln batches across requests itself


def _write_trtllm_repo(engine_dir: Path, output: Path, device: str) -> Path:
    from kiln.serve import trtllm_contract as c

    models = {
        "preprocessing": ("PreprocessingModel", c.PREPROCESSING_INPUTS,
                          c.PREPROCESSING_OUTPUTS, False),
        "tensorrt_llm": ("TensorRTLLMModel", c.TENSORRT_LLM_INPUTS, c.TENSORRT_LLM_OUTPUTS,
                         True),
        "postprocessing": ("PostprocessingModel", c.POSTPROCESSING_INPUTS,
                           c.POSTPROCESSING_OUTPUTS, False),
    }
    for name, (cls, inputs, outputs, decoupled) in models.items():
        (output / name / "1").mkdir(parents=True, exist_ok=True)
        (output / name / "1" / "model.py").write_text(
            f"# Written by `kiln triton-repo --tensorrt-llm`: kiln serves this model.\n"
            f"from kiln.serve.triton_trtllm import {cls} as TritonPythonModel  # noqa: F401\n")
        params = {"engine_dir": str(engine_dir), "device": device}
        (output / name / "config.pbtxt").write_text(c.python_model_config(
            name, inputs, outputs, _TRTLLM_MAX_BATCH, decoupled, params))
    (output / "ensemble" / "1").mkdir(parents=True, exist_ok=True)
    (output / "ensemble" / "config.pbtxt").write_text(c.ensemble_config(_TRTLLM_MAX_BATCH))
    return output / "ensemble"


def write_triton_repo(engine_dir: str | Path, output: str | Path, model_name: str = "kiln",
                      copy_engine: bool = False, device: str = "auto",
                      tensorrt_llm: bool = False) -> Path:
    """Write the repository; returns the model's folder (the ensemble's with
    `tensorrt_llm`). Existing files are replaced."""
    engine_dir = Path(engine_dir).resolve()
    load_engine_config(engine_dir)  # a clear error now, not when Triton loads the model
    if tensorrt_llm:
        if copy_engine:
            raise KilnError("--copy-engine goes with kiln's own model, not --tensorrt-llm")
        return _write_trtllm_repo(engine_dir, Path(output), device)
    if not model_name or any(c in model_name for c in '/\\"'):
        raise KilnError(f"--model-name {model_name!r} is not a valid Triton model name")
    model_dir = Path(output) / model_name
    version_dir = model_dir / "1"
    version_dir.mkdir(parents=True, exist_ok=True)
    # Copied as a file, not imported: it needs Triton's triton_python_backend_utils.
    shutil.copyfile(Path(__file__).with_name("triton_model.py"), version_dir / "model.py")
    if copy_engine:
        target = version_dir / "engine"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(engine_dir, target)
        engine_ref = "engine"  # relative: the repository can move (e.g. into an image)
    else:
        engine_ref = str(engine_dir)
    (model_dir / "config.pbtxt").write_text(config_pbtxt(model_name, engine_ref, device))
    return model_dir
