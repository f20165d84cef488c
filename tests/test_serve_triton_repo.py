"""`kiln triton-repo`: the repository's config parses as Triton's ModelConfig, and its
model.py, driven the way Triton's Python backend drives it (with a minimal stand-in for
triton_python_backend_utils), answers generate-style requests, streamed or whole."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

from kiln.cli import main
from kiln.serve.generate_params import INPUTS
from tests.conftest import SERVE_PROMPT as PROMPT
from tests.test_serve_support import tiny_chat_engine, wait_until

FINAL = 1


class FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class FakeResponse:
    def __init__(self, output_tensors=(), error=None) -> None:
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
        self.error = error

    def text(self) -> str:
        return self.outputs["text_output"][0].decode()


class FakeError:
    def __init__(self, message: str) -> None:
        self._message = message

    def message(self) -> str:
        return self._message


class FakeSender:
    def __init__(self) -> None:
        self.responses: list[tuple[FakeResponse | None, int]] = []
        self.finished = threading.Event()
        self.cancelled = False

    def send(self, response=None, flags: int = 0) -> None:
        assert not self.finished.is_set(), "a response after the final one"
        self.responses.append((response, flags))
        if flags & FINAL:
            self.finished.set()

    def is_cancelled(self) -> bool:
        return self.cancelled


class FakeRequest:
    def __init__(self, parameters: dict | None = None, **inputs: np.ndarray) -> None:
        self.inputs = inputs
        self.sender = FakeSender()
        self._parameters = json.dumps(parameters or {})

    def get_response_sender(self) -> FakeSender:
        return self.sender

    def parameters(self) -> str:
        return self._parameters


def _fake_pb_utils() -> types.ModuleType:
    pb = types.ModuleType("triton_python_backend_utils")
    pb.Tensor = FakeTensor
    pb.InferenceResponse = FakeResponse
    pb.TritonError = FakeError
    pb.TritonModelException = RuntimeError
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    pb.get_input_tensor_by_name = lambda request, name: (
        FakeTensor(name, request.inputs[name]) if name in request.inputs else None)
    pb.using_decoupled_model_transaction_policy = lambda config: config.get(
        "model_transaction_policy", {}).get("decoupled", False)
    return pb


def _model_config_json(config_pbtxt: Path) -> str:
    """What Triton hands `initialize`: the parsed config as JSON, proto field names."""
    from google.protobuf import json_format, text_format

    # tritonclient ships Triton's model config proto; load it without grpc installed.
    root = importlib.util.find_spec("tritonclient").submodule_search_locations[0]
    path = Path(root) / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = text_format.Parse(config_pbtxt.read_text(), module.ModelConfig())
    return json_format.MessageToJson(config, preserving_proto_field_name=True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    pytest.importorskip("google.protobuf")
    pytest.importorskip("tritonclient")
    out = tmp_path_factory.mktemp("triton")
    assert main(["triton-repo", str(tiny_chat_engine()), "-o", str(out), "--copy-engine",
                 "--device", "cpu"]) == 0
    return out / "kiln"


@pytest.fixture(scope="module")
def model(repo, monkeypatch_module):
    monkeypatch_module.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    spec = importlib.util.spec_from_file_location("kiln_triton_model", repo / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    instance = module.TritonPythonModel()
    instance.initialize({"model_config": _model_config_json(repo / "config.pbtxt"),
                         "model_repository": str(repo), "model_version": "1",
                         "model_name": "kiln", "model_instance_kind": "CPU"})
    yield instance
    instance.finalize()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_repository_layout(repo):
    config = json.loads(_model_config_json(repo / "config.pbtxt"))
    assert config["backend"] == "python" and config["model_transaction_policy"]["decoupled"]
    assert [i["name"] for i in config["input"]] == [name for name, _, _ in INPUTS]
    assert [i.get("optional", False) for i in config["input"]][:2] == [False, True]
    assert config["output"][0]["name"] == "text_output"
    assert config["parameters"]["engine_dir"]["string_value"] == "engine"  # copied, relative
    assert (repo / "1" / "model.py").is_file() and (repo / "1" / "engine" / "engine.json").is_file()


def _text(value: str) -> np.ndarray:
    return np.array([value.encode()], dtype=np.object_)


def _run(model, request: FakeRequest) -> FakeSender:
    assert model.execute([request]) is None  # decoupled: answers come through the sender
    assert request.sender.finished.wait(30)
    return request.sender


def test_whole_answer(model, greedy_text):
    sender = _run(model, FakeRequest(text_input=_text(PROMPT),
                                     max_tokens=np.array([8], np.int32),
                                     temperature=np.array([0.0], np.float32)))
    [(response, flags)] = sender.responses
    assert flags == FINAL and response.error is None
    assert response.text() == PROMPT + greedy_text
    sender = _run(model, FakeRequest({"max_tokens": 8, "temperature": 0},
                                     text_input=_text(PROMPT),
                                     exclude_input_in_output=np.array([True])))
    assert sender.responses[0][0].text() == greedy_text


def test_streamed_answer(model, greedy_text):
    sender = _run(model, FakeRequest(text_input=_text(PROMPT),
                                     max_tokens=np.array([8], np.int32),
                                     temperature=np.array([0.0], np.float32),
                                     stream=np.array([True])))
    texts = [r.text() for r, _ in sender.responses]
    assert len(texts) > 1 and "".join(texts) == greedy_text
    assert [f for _, f in sender.responses] == [0] * (len(texts) - 1) + [FINAL]


def test_bad_request_gets_an_error_response(model):
    for request in (FakeRequest(text_input=_text(PROMPT), temperature=np.array([-1.0])),
                    FakeRequest(text_input=_text(PROMPT), max_tokens=np.array([100_000])),
                    FakeRequest({"beams": 3}, text_input=_text(PROMPT))):
        [(response, flags)] = _run(model, request).responses
        assert flags == FINAL and response.error is not None
        assert response.error.message()


def test_cancelled_request_is_aborted(model):
    request = FakeRequest(text_input=_text(PROMPT), max_tokens=np.array([200]),
                          ignore_eos=np.array([True]), stream=np.array([True]))
    model.execute([request])
    assert wait_until(lambda: len(request.sender.responses) >= 2)
    request.sender.cancelled = True
    assert request.sender.finished.wait(30)
    assert len(request.sender.responses) < 50
    assert wait_until(lambda: model.loop.stats()["kv_blocks_used"] == 0)


def test_engine_referenced_by_path(tmp_path):
    engine = tiny_chat_engine()
    assert main(["triton-repo", str(engine), "-o", str(tmp_path), "--model-name", "llm"]) == 0
    text = (tmp_path / "llm" / "config.pbtxt").read_text()
    assert f'string_value: "{engine.resolve()}"' in text and 'name: "llm"' in text
    assert main(["triton-repo", str(tmp_path / "missing"), "-o", str(tmp_path)]) == 2


def test_triton_serve_command_line(tmp_path, capsys, monkeypatch):
    from tests.triton_support import triton_env_dir

    env = triton_env_dir()
    monkeypatch.delenv("KILN_TRITON_ENV", raising=False)
    assert main(["triton-serve", str(tmp_path)]) == 2  # no Triton env named
    assert "--triton-env is required" in capsys.readouterr().err
    assert main(["triton-serve", str(tmp_path / "nope"), "--triton-env", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["triton-serve", str(tmp_path), "--triton-env", str(tmp_path)]) == 2
    assert "not a Python venv" in capsys.readouterr().err
    if not (env / "pyvenv.cfg").is_file():
        pytest.skip(f"no Triton env at {env}")
    assert main(["triton-serve", str(tmp_path), "--triton-env", str(env),
                 "--http-port", "9100", "--print-command"]) == 0
    line = capsys.readouterr().out
    assert f"PATH={env.resolve()}/bin:" in line
    assert "tritonserver --model-repository" in line and "--http-port 9100" in line


class SlowSender(FakeSender):
    """A Triton server that takes 30 ms to take each response."""

    def send(self, response=None, flags: int = 0) -> None:
        time.sleep(0.03)
        super().send(response, flags)


def test_slow_sender_gets_coalesced_responses(model):
    """Responses go out from the sender thread; one that falls behind the engine gets
    several tokens per response, in order, the final flag once."""
    want = _run(model, FakeRequest(text_input=_text(PROMPT), max_tokens=np.array([24]),
                                   ignore_eos=np.array([True]), temperature=np.array([0.0]),
                                   exclude_input_in_output=np.array([True]))).responses
    request = FakeRequest(text_input=_text(PROMPT), max_tokens=np.array([24]),
                          ignore_eos=np.array([True]), temperature=np.array([0.0]),
                          stream=np.array([True]))
    request.sender = SlowSender()
    sender = _run(model, request)
    texts = [r.text() for r, _ in sender.responses]
    assert "".join(texts) == want[0][0].text()
    assert [f for _, f in sender.responses] == [0] * (len(texts) - 1) + [FINAL]
    assert len(texts) < 24


def test_cancelled_whole_answer_is_aborted(model):
    """A whole answer sends nothing before its end, but its cancellation is still seen."""
    request = FakeRequest(text_input=_text(PROMPT), max_tokens=np.array([200]),
                          ignore_eos=np.array([True]))
    model.execute([request])
    assert wait_until(lambda: model.loop.stats()["kv_blocks_used"] > 0)
    request.sender.cancelled = True
    assert request.sender.finished.wait(30)
    [(response, flags)] = request.sender.responses
    assert response is None and flags == FINAL
    assert wait_until(lambda: model.loop.stats()["kv_blocks_used"] == 0)
