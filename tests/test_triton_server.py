"""A real Triton Inference Server (from nvidia-pytriton) running `kiln triton-repo`'s
SmolLM2 model: Triton's HTTP generate endpoints and gRPC streaming of the decoupled
model give the engine's own greedy answers; concurrent requests share one running batch
inside the one model instance; a cancelled stream gives its KV blocks back; a bounded
load of 64 concurrent streams, one in ten cancelled, ends with no errors and no blocks
held. The server itself is the session fixture `tritonserver` (stops with exit 0)."""

from __future__ import annotations

import json
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from kiln import LLM, SamplingParams
from tests.test_serve_support import wait_until

PROMPTS = ["The capital of France is", "Once upon a time, a little fox",
           "def fibonacci(n):", "List three colours: red,"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def reference(smollm2_engine):
    return LLM(smollm2_engine, device="cpu")


@pytest.fixture(scope="module")
def greedy(reference):
    """prompt -> the engine's greedy continuation (one call, all prompts batched)."""
    outs = reference.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    return {p: o.text for p, o in zip(PROMPTS, outs)}


def test_model_ready_over_tritonclient_http(tritonserver):
    import tritonclient.http as http

    client = http.InferenceServerClient(tritonserver.http.removeprefix("http://"))
    assert client.is_server_live() and client.is_model_ready("kiln")
    metadata = client.get_model_metadata("kiln")
    assert metadata["inputs"][0] == {"name": "text_input", "datatype": "BYTES", "shape": [1]}
    assert [o["name"] for o in metadata["outputs"]] == ["text_output"]
    config = client.get_model_config("kiln")
    assert config["model_transaction_policy"]["decoupled"] is True


def test_generate_equals_llm_generate(tritonserver, greedy):
    for prompt in PROMPTS:
        r = httpx.post(f"{tritonserver.http}/v2/models/kiln/generate", timeout=60, json={
            "text_input": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["text_output"] == prompt + greedy[prompt]
    r = httpx.post(f"{tritonserver.http}/v2/models/kiln/generate", timeout=60, json={
        "text_input": PROMPTS[0], "parameters": {"max_tokens": MAX_TOKENS, "temperature": 0,
                                                 "exclude_input_in_output": True}})
    assert r.json()["text_output"] == greedy[PROMPTS[0]]


def test_generate_stream_equals_llm_generate(tritonserver, greedy):
    prompt = PROMPTS[1]
    pieces = []
    with httpx.stream("POST", f"{tritonserver.http}/v2/models/kiln/generate_stream",
                      timeout=60, json={"text_input": prompt, "max_tokens": MAX_TOKENS,
                                        "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                pieces.append(json.loads(line[6:])["text_output"])
    assert len(pieces) > 3 and "".join(pieces) == greedy[prompt]


def test_bad_request_is_a_clear_error(tritonserver):
    r = httpx.post(f"{tritonserver.http}/v2/models/kiln/generate", timeout=60,
                   json={"text_input": "hi", "temperature": -1})
    assert r.status_code == 400 and "temperature" in r.json()["error"]


# ---- gRPC streaming: the decoupled model's own protocol --------------------------------
def _grpc_inputs(prompt: str, **params):
    import tritonclient.grpc as grpc

    tensors = [("text_input", np.array([prompt.encode()], dtype=np.object_), "BYTES")]
    for name, value in params.items():
        if isinstance(value, bool):
            tensors.append((name, np.array([value]), "BOOL"))
        elif isinstance(value, int):
            tensors.append((name, np.array([value], np.int32), "INT32"))
        else:
            tensors.append((name, np.array([value], np.float32), "FP32"))
    inputs = []
    for name, array, datatype in tensors:
        tensor = grpc.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


class GrpcStream:
    """One tritonclient gRPC stream; `responses` gets (text | None, final, error)."""

    def __init__(self, url: str) -> None:
        import tritonclient.grpc as grpc

        self.client = grpc.InferenceServerClient(url)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=self._callback)

    def _callback(self, result, error) -> None:
        if error is not None:
            self.responses.put((None, True, error))
            return
        final = result.get_response().parameters["triton_final_response"].bool_param
        text = result.as_numpy("text_output")
        self.responses.put((text[0].decode() if text is not None else None, final, None))

    def send(self, prompt: str, request_id: str = "", **params) -> None:
        self.client.async_stream_infer("kiln", _grpc_inputs(prompt, **params),
                                       request_id=request_id, enable_empty_final_response=True)

    def collect(self, timeout: float = 120) -> tuple[str, list]:
        pieces, errors = [], []
        while True:
            text, final, error = self.responses.get(timeout=timeout)
            if error is not None:
                errors.append(error)
            elif text is not None:
                pieces.append(text)
            if final:
                return "".join(pieces), errors

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def test_grpc_stream_equals_llm_generate(tritonserver, greedy):
    stream = GrpcStream(tritonserver.grpc)
    try:
        for prompt in PROMPTS[2:]:
            stream.send(prompt, max_tokens=MAX_TOKENS, temperature=0.0, stream=True)
            text, errors = stream.collect()
            assert not errors and text == greedy[prompt]
    finally:
        stream.close()


def test_cancelled_grpc_stream_frees_kv_blocks(tritonserver):
    # the previous tests' requests are released after their final responses went out
    assert wait_until(lambda: tritonserver.kiln_gauge("kv_blocks_used") == 0, timeout=30)
    stream = GrpcStream(tritonserver.grpc)
    stream.send(PROMPTS[0], max_tokens=1500, ignore_eos=True, stream=True)
    for _ in range(3):  # it is running: tokens arrive, blocks are held
        text, final, error = stream.responses.get(timeout=120)
        assert error is None and not final
    assert tritonserver.kiln_gauge("kv_blocks_used") > 0
    stream.close(cancel=True)
    assert wait_until(lambda: tritonserver.kiln_gauge("kv_blocks_used") == 0, timeout=30)
    assert tritonserver.kiln_gauge("num_running") == 0


def test_concurrent_requests_share_one_running_batch(tritonserver, reference):
    """In-flight batching inside the one model instance: 16 concurrent requests are in
    the engine's running batch together, and each still gets its own greedy answer."""
    prompts = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(16)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    want = [o.text for o in reference.generate(prompts, params)]
    peak, done = [0.0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], tritonserver.kiln_gauge("num_running"))
            time.sleep(0.02)

    def one(prompt: str) -> str:
        r = httpx.post(f"{tritonserver.http}/v2/models/kiln/generate", timeout=120, json={
            "text_input": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "exclude_input_in_output": True})
        assert r.status_code == 200, r.text
        return r.json()["text_output"]

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(one, prompts))
    finally:
        done.set()
        watcher.join()
    assert got == want
    assert peak[0] >= 8  # not one at a time: most of the 16 ran in one batch


def test_load_64_concurrent_streams_with_cancellations(tritonserver, reference):
    """A bounded load: 64 gRPC streams at once, one in ten hung up (cancelled) after two
    responses. Every other stream gets exactly the engine's greedy text, nothing errors,
    and every KV block comes back."""
    prompts = [f"Stream {i}: tell me about " + "kilns " * (i % 3) for i in range(64)]
    cancelled = set(range(3, 64, 10))
    kept = [i for i in range(64) if i not in cancelled]
    outs = reference.generate([prompts[i] for i in kept],
                              SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    want = {i: o.text for i, o in zip(kept, outs)}
    got: dict[int, str] = {}

    def one(i: int) -> None:
        stream = GrpcStream(tritonserver.grpc)
        try:
            if i in cancelled:
                stream.send(prompts[i], max_tokens=500, ignore_eos=True, stream=True)
                for _ in range(2):
                    text, final, error = stream.responses.get(timeout=300)
                    assert error is None and not final
                stream.close(cancel=True)
                return
            stream.send(prompts[i], max_tokens=4, temperature=0.0, ignore_eos=True,
                        stream=True)
            text, errors = stream.collect(timeout=300)
            assert not errors, errors
            got[i] = text
            stream.close()
        except BaseException:
            stream.close(cancel=True)
            raise

    with ThreadPoolExecutor(64) as pool:
        for future in [pool.submit(one, i) for i in range(64)]:
            future.result()
    assert got == want
    assert wait_until(lambda: tritonserver.kiln_gauge("kv_blocks_used") == 0, timeout=60)
    assert tritonserver.kiln_gauge("num_running") == 0
    assert tritonserver.kiln_gauge("num_waiting") == 0
    assert httpx.get(f"{tritonserver.http}/v2/health/ready").status_code == 200


def test_bench_serving_against_tritonserver(tritonserver, tmp_path):
    from kiln.cli import main

    out = tmp_path / "triton.json"
    assert main(["bench", "serving", "--api", "triton", "--url", tritonserver.http,
                 "--concurrency", "1,4", "--num-prompts", "4", "--input-len", "8",
                 "--output-len", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == "kiln"
    for level in result["levels"]:
        assert level["num_ok"] == 4 and level["num_failed"] == 0
        # ignore_eos: output_len tokens each, however many responses carried them
        assert level["mean_output_tokens"] == 4
        assert 0 < level["ttft_ms"]["p50"] <= level["e2e_ms"]["p99"]
