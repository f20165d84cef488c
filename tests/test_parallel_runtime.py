"""Multi-rank engines as users start them, over real gloo process groups on the CPU:
kiln's own spawned workers, torchrun on two "nodes" of one machine, the server, and what
happens when a rank dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import httpx
import pytest

from kiln import LLM, SamplingParams
from kiln.build import build
from kiln.config import BuildConfig
from kiln.distributed.launch import free_port
from kiln.runtime.engine import LLMEngine, RuntimeConfig
from tests.test_runtime import make_prompts, run_all
from tests.test_serve_support import start_kiln_serve, tiny_chat_checkpoint

CFG = dict(dtype="float32", max_seq_len=256, max_batch_size=16, max_num_tokens=512)
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    hf = tiny_chat_checkpoint()
    out = {tp: build(hf, root / f"tp{tp}", BuildConfig(**CFG, tp_size=tp), progress=False)
           for tp in (1, 2)}
    out["pp2"] = build(hf, root / "pp2", BuildConfig(**CFG, pp_size=2), progress=False)
    out["tp2pp2"] = build(hf, root / "tp2pp2", BuildConfig(**CFG, tp_size=2, pp_size=2),
                          progress=False)
    return out



@pytest.mark.parametrize("overlap", [False, True])
def test_tp2_engine_matches_single_rank_with_staggered_arrivals(engines, overlap):
    """Requests arriving at different steps, chunked prefill (a 24-token budget), greedy
    and seeded sampling, with and without overlap scheduling: rank 0 mirrors every call
    and the ranks stay in lockstep, so the tokens are the single-rank engine's."""
    prompts = make_prompts(10, seed=5)
    arrivals = [0, 0, 1, 2, 2, 3, 5, 8, 8, 13]
    runtime = dict(device="cpu", max_num_tokens=24, overlap_scheduling=overlap)
    for params in (SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
                   SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=7,
                                  ignore_eos=True)):
        want = run_all(LLMEngine(engines[1], RuntimeConfig(**runtime)), prompts, params,
                       arrivals)
        engine = LLMEngine(engines[2], RuntimeConfig(**runtime))
        try:
            assert run_all(engine, prompts, params, arrivals) == want
        finally:
            engine.close()


def test_tp2_ngram_speculation_matches_plain_tp2(tiny_checkpoints, tmp_path):
    """n-gram speculative decoding on a TP2 engine: every rank proposes the same drafts
    from the same tokens and verifies them in lockstep (seeded sampling rows too: a rank
    out of step would hang the group), so greedy tokens are the plain TP2 engine's;
    greedy drafts get accepted (the tiny llama of tests/test_speculative.py continues
    repeated phrases), blocks come back."""
    from tests.test_speculative import repeating_prompts

    folder = tiny_checkpoints["llama"][0]
    engine_dir = build(folder, tmp_path / "tp2", BuildConfig(**CFG, tp_size=2), progress=False)
    prompts = repeating_prompts(6) + make_prompts(3, seed=3)
    arrivals = [i // 2 for i in range(len(prompts))]
    spec = {"method": "ngram", "num_speculative_tokens": 3}
    for params in (SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
                   SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=7,
                                  ignore_eos=True)):
        got = {}
        for config in (None, spec):
            engine = LLMEngine(engine_dir, RuntimeConfig(device="cpu", max_num_tokens=24,
                                                         speculative_config=config))
            try:
                got[config is None] = run_all(engine, prompts, params, arrivals)
                if config is not None:
                    stats = engine.stats()
                    assert stats["spec_num_draft_tokens"] > 0 and stats["kv_blocks_used"] == 0
                    if params.greedy:  # sampled drafts of this flat random model: rejected
                        assert stats["spec_num_accepted_tokens"] > 0
            finally:
                engine.close()
        if params.greedy:
            assert got[False] == got[True]
        else:  # rejection sampling: the target's distribution, not plain decoding's draws
            assert all(len(t) == 24 for t in got[False].values())


def test_draft_model_speculation_on_several_ranks_is_refused(engines):
    from kiln.errors import KilnError

    with pytest.raises(KilnError, match="ngram method on tensor-parallel"):
        LLMEngine(engines[2], RuntimeConfig(device="cpu", speculative_config={
            "method": "draft_model", "model": str(engines[1]), "num_speculative_tokens": 2}))


@pytest.mark.parametrize("layout,depth", [("pp2", None), ("pp2", 3), ("tp2pp2", None)])
def test_pipeline_engines_match_single_rank(engines, layout, depth):
    """Pipeline stages (2 and, with TP2 inside each, 4 processes) with two (or `depth`)
    micro-batches in flight: the last stage samples and every rank applies its tokens;
    logprobs, prompt logprobs and full-sequence logits come back from the last stage to
    rank 0. (On the CPU a stage does not wait in the tokens' broadcast: it launches its
    next micro-batch and waits when it needs the tokens.)"""
    prompts = make_prompts(6, seed=9)
    arrivals = [0, 0, 1, 3, 4, 6]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=2,
                            prompt_logprobs=1)
    single = LLMEngine(engines[1], RuntimeConfig(device="cpu", max_num_tokens=24))
    want = run_all(single, prompts, params, arrivals)
    engine = LLMEngine(engines[layout], RuntimeConfig(device="cpu", max_num_tokens=24,
                                                      pipeline_depth=depth))
    try:
        assert run_all(engine, prompts, params, arrivals) == want
        # micro-batches: the stages held that many disjoint batches at once
        assert engine.max_in_flight == (depth or 2)
        seeded = SamplingParams(max_tokens=6, temperature=1.0, top_p=0.9, seed=3,
                                ignore_eos=True)
        assert run_all(engine, prompts, seeded, arrivals) == \
            run_all(single, prompts, seeded, arrivals)
        tokens = list(range(5, 60))
        got_logits = engine.sequence_logits(tokens)
        assert (got_logits - single.sequence_logits(tokens)).abs().max() < 1e-4
        one = SamplingParams(max_tokens=3, temperature=0, logprobs=2, prompt_logprobs=1)
        a = _finish(engine, [7, 8, 9, 10], one)
        b = _finish(single, [7, 8, 9, 10], one)
        assert a.token_ids == b.token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.keys() == y.keys() and all(abs(x[k] - y[k]) < 1e-4 for k in x)
        assert [p and sorted(p) for p in a.prompt_logprobs] == \
            [p and sorted(p) for p in b.prompt_logprobs]
    finally:
        engine.close()


def _finish(engine, prompt, params):
    request_id = engine.add_request(prompt, params)
    while True:
        for out in engine.step():
            if out.request_id == request_id and out.finished:
                return out


def test_tp2_unseeded_sampling_and_abort(engines):
    """An unseeded request draws the same seed on every rank (rank 0 sends it); an abort
    reaches the workers, and the engine goes on."""
    llm = LLM(engines[2], device="cpu")
    try:
        engine = llm.engine
        keep = engine.add_request([5, 6, 7], SamplingParams(max_tokens=6, temperature=1.0))
        gone = engine.add_request([8, 9], SamplingParams(max_tokens=50, ignore_eos=True))
        engine.step()
        engine.abort(gone)
        finished = {}
        while engine.has_unfinished():
            for out in engine.step():
                finished[out.request_id] = out
        assert set(finished) == {keep} and len(finished[keep].outputs[0].token_ids) >= 1
        out = llm.generate("Hello", SamplingParams(max_tokens=4, temperature=0))[0]
        assert len(out.token_ids) == 4
    finally:
        llm.engine.close()


RUN = ["-m", "kiln", "run", "--prompt", "Hello there", "--max-tokens", "8", "--device", "cpu"]


@pytest.mark.parametrize("per_node,engine", [(1, 2), (2, "tp2pp2")])
def test_torchrun_two_nodes_give_single_rank_tokens(engines, per_node, engine):
    """Two torchrun "nodes" (c10d rendezvous on loopback) of one process each (a TP2
    engine) and of two (TP2 x PP2: a stage a node): rank 0 prints what the single-rank
    engine prints."""
    single = subprocess.run([sys.executable, *RUN[:3], str(engines[1]), *RUN[3:]],
                            capture_output=True, text=True, timeout=120, env=ENV)
    assert single.returncode == 0, single.stderr
    port = free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                "--nproc-per-node", str(per_node), "--rdzv-backend", "c10d", "--rdzv-endpoint",
                f"127.0.0.1:{port}", "--rdzv-id", "kiln-test", "--max-restarts", "0"]
    # Both "nodes" resolve the endpoint to themselves: say which one hosts the store, as
    # a deployment with one machine per node does implicitly. A Python stack of every
    # process is dumped on SIGABRT, should the run hang.
    env = {**ENV, "PYTHONFAULTHANDLER": "1"}
    for attempt in (1, 2):
        nodes = [subprocess.Popen([*torchrun, "--rdzv-conf", f"is_host={int(host)}", *RUN[:3],
                                   str(engines[engine]), *RUN[3:]], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
                 for host in (True, False)]
        results = _communicate_or_dump(nodes, timeout=180)
        if all(node.returncode == 0 for node in nodes):
            texts = [out for out, _ in results if out.strip()]
            assert texts == [single.stdout]  # one node printed (rank 0), the same text
            return
        # A process ended badly: seen once in CI (a worker of the store's node), never in
        # over a hundred local runs, idle or loaded. Run again once; say so in full.
        report = "\n".join(f"--- node {i} (exit {node.returncode}):\n{out}\n{err}"
                           for i, (node, (out, err)) in enumerate(zip(nodes, results)))
        if attempt == 2:
            pytest.fail(f"a torchrun node failed twice:\n{report}", pytrace=False)
        warnings.warn(f"a torchrun node failed; running again:\n{report}", stacklevel=1)
        port = free_port()
        torchrun[torchrun.index("--rdzv-endpoint") + 1] = f"127.0.0.1:{port}"


# Generates forever once loaded; says so on stdout ("ready") and, given a second
# argument, by creating that file (under torchrun, whichever node holds rank 0).
_SCRIPT = textwrap.dedent("""
    import pathlib, sys, time
    from kiln import LLM, SamplingParams
    llm = LLM(sys.argv[1], device="cpu")  # ranks other than 0 serve rank 0 in here
    print("ready", flush=True)
    if len(sys.argv) > 2:
        pathlib.Path(sys.argv[2]).touch()
    while True:
        llm.generate([1, 2, 3], SamplingParams(max_tokens=4))
        time.sleep(0.05)
""")


def test_torchrun_a_killed_node_stops_the_other_with_one_line(engines, tmp_path):
    """Two torchrun "nodes": the worker of one is killed; the other node's rank (rank 0
    or 1, whichever it holds) exits within seconds with kiln's line, not a traceback."""
    script, ready = tmp_path / "loop.py", tmp_path / "ready"
    script.write_text(_SCRIPT)
    port = free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node",
         "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id",
         "kiln-kill", "--max-restarts", "0", "--rdzv-conf", f"is_host={host}", str(script),
         str(engines[2]), str(ready)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env=ENV) for host in (1, 0)]
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert time.monotonic() < deadline and all(n.poll() is None for n in nodes), \
                [n.communicate(timeout=5)[1][-2000:] for n in nodes if n.poll() is not None]
            time.sleep(0.2)
        victims = [p for p in _children(nodes[1].pid)  # the worker of the node not
                   if str(script) in open(f"/proc/{p}/cmdline").read()]  # holding the store
        assert len(victims) == 1
        os.kill(victims[0], signal.SIGKILL)
        started = time.monotonic()
        _, stderr = _communicate_or_dump(nodes[:1], timeout=60)[0]
        assert time.monotonic() - started < 20
        assert nodes[0].returncode != 0
        lines = [x for x in stderr.splitlines() if "lost a peer rank" in x]
        assert len(lines) == 1 and lines[0].startswith("kiln: rank "), stderr
        assert lines[0].endswith("the engine cannot continue"), stderr
        nodes[1].communicate(timeout=60)
    finally:
        for pid in [pid for node in nodes for pid in _descendants(node.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _communicate_or_dump(procs: list[subprocess.Popen], timeout: float) -> list[tuple]:
    """Every process's (stdout, stderr); past the timeout, a stack dump of each process
    and its descendants (SIGABRT + PYTHONFAULTHANDLER) and a failure that shows them."""
    deadline = time.monotonic() + timeout
    try:
        return [p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        pids = [pid for p in procs for pid in _descendants(p.pid)]
        for pid in reversed(pids):  # workers first, then their launchers
            try:
                os.kill(pid, signal.SIGABRT)
            except ProcessLookupError:
                pass
        time.sleep(2)
        for p in procs:
            p.kill()
        dumps = [p.communicate()[1][-6000:] for p in procs]
        pytest.fail(f"still running after {timeout:.0f} s; stacks:\n" + "\n----\n".join(dumps))


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _descendants(pid: int) -> list[int]:
    """pid and every process below it, parents before their children."""
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop(0))
        todo += _children(found[-1])
    return found


def assert_unhealthy(url: str) -> None:
    """/health turns 503 within 10 s (a rank was lost), and a new request is refused."""
    deadline = time.monotonic() + 10
    while httpx.get(url + "/health").status_code != 503:
        assert time.monotonic() < deadline, "/health stayed 200"
        time.sleep(0.2)
    refused = httpx.post(url + "/v1/completions", json={"model": "tp2", "prompt": "Hi",
                                                         "max_tokens": 2}, timeout=10)
    assert refused.status_code == 503


def test_a_dead_worker_stops_rank_0_with_a_message(engines):
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, str(engines[2])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        assert proc.stdout.readline().strip() == "ready"
        workers = [p for p in _children(proc.pid)
                   if "spawn" in open(f"/proc/{p}/cmdline").read()]
        assert workers
        os.kill(workers[0], signal.SIGKILL)
        started = time.monotonic()
        _, stderr = proc.communicate(timeout=30)
        assert time.monotonic() - started < 10
        assert proc.returncode == 1
        assert stderr.count("worker rank 1 died") == 1, stderr
    finally:
        proc.kill()


def test_kiln_serve_tp2_answers_and_turns_unhealthy_when_a_worker_dies(engines):
    import openai

    proc, url = start_kiln_serve(engines[2], "--served-model-name", "tp2", env=ENV)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        reply = client.completions.create(model="tp2", prompt="Hello", max_tokens=5,
                                          temperature=0)
        assert reply.usage.completion_tokens == 5
        # The server's child is the engine process (rank 0); the ranks it spawned are its
        # children.
        workers = [p for c in _children(proc.pid) for p in _children(c)
                   if "spawn" in open(f"/proc/{p}/cmdline").read()]
        assert workers
        os.kill(workers[0], signal.SIGKILL)
        assert_unhealthy(url)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
