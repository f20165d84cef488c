"""The engine in a child process (`kiln serve --engine-process`, kiln.serve.engine_proc):
the same answers as in one process (the OpenAI tests again, against such a server), bad
requests still 4xx while others run, hang-ups free their KV blocks, an engine that dies
is reported (503), and no engine process outlives its server."""

from __future__ import annotations

import json
import os
import signal
import threading

import httpx
import pytest

from kiln.runtime.request import CompletionOutput, RequestOutput
from kiln.serve.engine_wire import OutputAssembler, OutputEncoder
from tests.test_parallel_failures import _alive
from tests.test_serve_errors import (  # noqa: F401 -- run again against this module's server
    test_bad_completion_requests,
    test_client_that_hangs_up_aborts_a_whole_answer,
    test_openai_client_sees_bad_request_and_server_goes_on,
)
from tests.test_serve_openai import (  # noqa: F401
    test_async_client_chat_streaming,
    test_batched_and_token_id_prompts,
    test_chat_logprobs,
    test_chat_matches_engine_chat,
    test_completion_logprobs,
    test_completions_match_engine,
    test_n_choices_are_seeded,
    test_stop_string_is_cut_in_streams_too,
    test_streamed_completion_equals_whole,
    test_streamed_n_choices_finish_once_each,
)
from tests.test_serve_openai_extras import (  # noqa: F401
    test_echo_with_logprobs_covers_prompt_tokens,
    test_prompt_logprobs_extension,
)
from tests.test_serve_support import (
    MODEL,
    serve,
    start_kiln_serve,
    tiny_chat_engine,
    wait_until,
)

LONG = {"model": MODEL, "prompt": "Hi", "max_tokens": 200, "ignore_eos": True,
        "stream": True}


@pytest.fixture(scope="module")
def server():
    with serve(engine_process=True) as served:
        yield served


def _idle(server) -> bool:
    return server.llm.num_unfinished == 0 and server.llm.stats()["kv_blocks_used"] == 0


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return out


def test_the_engine_runs_in_another_process(server):
    process = server.llm._loop
    assert process.pid != os.getpid() and _alive(process.pid)
    assert server.llm.engine.max_seq_len == 256 and server.llm.tokenizer is not None


def test_bad_request_is_400_while_a_stream_goes_on(server):
    chunks: list[str] = []

    def stream() -> None:
        with httpx.stream("POST", server.v1 + "/completions", json=LONG, timeout=120) as r:
            chunks.extend(line for line in r.iter_lines() if line.startswith("data: "))

    reader = threading.Thread(target=stream)
    reader.start()
    try:
        bad = httpx.post(server.v1 + "/completions", json={**LONG, "max_tokens": 5000})
        assert bad.status_code == 400 and "max_seq_len" in bad.json()["error"]["message"]
        bad = httpx.post(server.v1 + "/completions", json={**LONG, "temperature": -1})
        assert bad.status_code == 400
    finally:
        reader.join(120)
    assert chunks[-1] == "data: [DONE]"
    text = "".join(json.loads(c[6:])["choices"][0]["text"] for c in chunks[:-1])
    assert json.loads(chunks[-2][6:])["choices"][0]["finish_reason"] == "length" and text
    assert wait_until(lambda: _idle(server))


def test_stream_hang_up_frees_the_blocks(server):
    long = {**LONG, "n": 4, "max_tokens": 250}  # seconds of work for the tiny model
    with httpx.stream("POST", server.v1 + "/completions", json=long, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                assert server.llm.num_unfinished == 1
                assert server.llm.stats()["kv_blocks_used"] > 0
                break  # one chunk, then hang up
    assert wait_until(lambda: _idle(server))


def test_engine_death_is_503():
    with serve(engine_process=True) as served:
        def stream() -> list[str]:
            with httpx.stream("POST", served.v1 + "/completions", json=LONG, timeout=60) as r:
                return [line for line in r.iter_lines() if line.startswith("data: ")]

        result: list[list[str]] = []
        reader = threading.Thread(target=lambda: result.append(stream()))
        reader.start()
        assert wait_until(lambda: served.llm.stats()["num_running"] == 1, 30)
        os.kill(served.llm._loop.pid, signal.SIGKILL)
        reader.join(60)
        assert result and result[0][-1] == "data: [DONE]"
        error = json.loads(result[0][-2][6:])["error"]
        assert "engine process died" in error["message"]
        assert wait_until(lambda: not served.llm.alive)
        assert httpx.get(served.url + "/health").status_code == 503
        refused = httpx.post(served.v1 + "/completions",
                             json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert refused.status_code == 503


def test_shutdown_stops_the_engine_process():
    with serve(engine_process=True) as served:
        pid = served.llm._loop.pid
        assert _alive(pid)
    assert not _alive(pid)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["term", "kill"])
def test_kiln_serve_leaves_no_engine_process(sig):
    proc, url = start_kiln_serve(tiny_chat_engine(), "--served-model-name", MODEL,
                                 "--engine-process", env={"OMP_NUM_THREADS": "1"})
    try:
        children = _children(proc.pid)
        assert len(children) >= 1, "no engine process"
        ok = httpx.post(url + "/v1/completions",
                        json={"model": MODEL, "prompt": "Hi", "max_tokens": 4})
        assert ok.status_code == 200
        proc.send_signal(sig)
        assert proc.wait(60) == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
        # Killed, the server cannot stop its child: the child sees its pipe close.
        assert wait_until(lambda: not any(map(_alive, children)), 30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_deltas_rebuild_cumulative_outputs_and_cut_stop_strings():
    encoder, assembler = OutputEncoder(), OutputAssembler("r")

    def out(text: str, tokens: list[int], finished: bool = False,
            logprobs: list | None = None) -> RequestOutput:
        return RequestOutput("r", "p", [1, 2], [CompletionOutput(
            0, text, tokens, "stop" if finished else None, logprobs=logprobs)], finished)

    steps = [out("Hel", [5], logprobs=[{5: -0.1}]),
             out("Hello wor", [5, 6, 7], logprobs=[{5: -0.1}, {6: -1.0}, {7: -2.0}]),
             out("Hello", [5, 6, 7, 8], True,  # a stop string cut the text back
                 logprobs=[{5: -0.1}, {6: -1.0}, {7: -2.0}, {8: -0.5}])]
    for want in steps:
        got = assembler.apply(encoder.encode(want))
        assert (got.text, got.token_ids, got.outputs[0].logprobs, got.finished) == \
            (want.text, want.token_ids, want.outputs[0].logprobs, want.finished)
        assert got.prompt_token_ids == [1, 2] and got.prompt == "p"
    assert encoder._sent == {}  # a finished request leaves nothing behind


def test_in_process_is_still_there():
    with serve() as served:
        assert served.llm._loop.__class__.__name__ == "EngineLoop"
        response = httpx.post(served.v1 + "/completions",
                              json={"model": MODEL, "prompt": "Hi", "max_tokens": 3})
        assert response.status_code == 200
