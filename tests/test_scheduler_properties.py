"""Property-based tests: KV manager and scheduler invariants under random traffic.

The scheduler is pure Python, so the model is replaced by a stub that "samples" a
fixed token; hypothesis drives random add / step / abort sequences.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.request import Request, RequestStatus, SamplingParams
from kiln.runtime.scheduler import Scheduler

BLOCK = 4


def check_invariants(sched: Scheduler, live: dict[str, Request]) -> None:
    kv = sched.kv
    holders = [r for r in live.values() if r.block_ids]
    refs = [0] * kv.num_blocks
    for r in holders:
        for b in r.block_ids:
            refs[b] += 1
        # Blocks cover the computed tokens, never more than one block beyond need.
        assert len(r.block_ids) * BLOCK >= r.num_computed_tokens
    assert refs == kv.ref_counts
    assert set(kv.free_queue) == {b for b in range(kv.num_blocks) if refs[b] == 0}
    for h, b in kv.cached.items():
        assert kv.block_hash[b] == h
    assert len(sched.running) <= sched.max_batch_size
    assert all(r.status is RequestStatus.RUNNING for r in sched.running)
    assert all(r.status is RequestStatus.WAITING and not r.block_ids for r in sched.waiting)


def apply_op(op: tuple, sched: Scheduler, live: dict[str, Request], max_len: int,
             step, ids: itertools.count) -> None:
    """add (a prompt sharing 0-3 leading pairs of tokens with others), step, or abort."""
    if op[0] == "add":
        _, prompt_len, max_tokens, shared = op
        prompt_len = min(prompt_len, max_len - max_tokens)
        prompt = [1, 2, 3, 4, 5, 6, 7, 8][: shared * 2] + list(range(100, 100 + prompt_len))
        prompt = prompt[:max_len - max_tokens]
        r = Request(str(next(ids)), prompt, SamplingParams(max_tokens=max_tokens), max_tokens)
        live[r.request_id] = r
        sched.add(r)
    elif op[0] == "step":
        step()
    else:
        target = live.get(str(op[1]))
        if target is not None:
            sched.finish(target, RequestStatus.FINISHED_ABORTED)
            del live[target.request_id]


ops = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 30), st.integers(1, 12), st.integers(0, 3)),
    st.tuples(st.just("step")),
    st.tuples(st.just("abort"), st.integers(0, 50)),
), min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(ops=ops, num_blocks=st.integers(12, 40), budget=st.integers(1, 64),
       batch=st.integers(1, 6), policy=st.sampled_from(["max_utilization",
                                                         "guaranteed_no_evict"]),
       prefix=st.booleans(), chunked=st.booleans())
def test_invariants_under_random_traffic(ops, num_blocks, budget, batch, policy, prefix,
                                         chunked):
    kv = KVCacheManager(num_blocks, BLOCK, enable_prefix_caching=prefix)
    max_len = (num_blocks // 2) * BLOCK  # every request fits alone in half the pool
    if not chunked:  # the engine refuses a budget below max_seq_len without chunking
        budget = max(budget, max_len)
    sched = Scheduler(kv, batch, budget, policy, chunked)
    live: dict[str, Request] = {}
    ids = itertools.count()

    def step() -> None:
        out = sched.schedule()
        assert out.num_tokens <= budget
        assert len({id(s.request) for s in out.scheduled}) == len(out.scheduled)
        if policy == "guaranteed_no_evict":
            assert not out.preempted
        for entry in out.scheduled:
            r = entry.request
            assert r.status is RequestStatus.RUNNING
            assert r.num_computed_tokens + entry.num_new_tokens <= len(r.block_ids) * BLOCK
        sched.update(out)
        for entry in out.scheduled:
            r = entry.request
            if entry.sample:
                assert r.num_computed_tokens == r.num_tokens
                r.token_ids.append(7)
                if r.num_output_tokens >= r.max_tokens:
                    sched.finish(r, RequestStatus.FINISHED_LENGTH)
                    del live[r.request_id]
        check_invariants(sched, live)

    for op in ops:
        apply_op(op, sched, live, max_len, step, ids)
        check_invariants(sched, live)
    # Drain: everything finishes, and every block comes back.
    for _ in range(2000):
        if not sched.has_unfinished():
            break
        step()
    assert not sched.has_unfinished() and not live
    assert kv.num_free_blocks == kv.num_blocks


@settings(max_examples=200, deadline=None)
@given(ops=ops, num_blocks=st.integers(12, 40), budget=st.integers(1, 64),
       batch=st.integers(1, 6), depth=st.integers(2, 3), prefix=st.booleans())
def test_pipeline_micro_batches_never_touch_requests_in_flight(ops, num_blocks, budget, batch,
                                                               depth, prefix):
    """Pipeline parallel: up to `depth` micro-batches in flight. A request inside one is
    neither scheduled again nor preempted (its blocks stay as they are) until its tokens
    are applied; each micro-batch takes at most its share of the active requests."""
    kv = KVCacheManager(num_blocks, BLOCK, enable_prefix_caching=prefix)
    max_len = (num_blocks // 2) * BLOCK
    sched = Scheduler(kv, batch, budget, "max_utilization", True)
    live: dict[str, Request] = {}
    in_flight: list[tuple[list, dict[str, list[int]]]] = []  # (entries, blocks held)
    ids = itertools.count()

    def apply_oldest() -> None:
        entries, held = in_flight.pop(0)
        for entry in entries:
            r = entry.request
            assert r.block_ids == held[r.request_id] or r.status.finished
            if entry.sample and not r.status.finished:
                r.token_ids.append(7)
                if r.num_output_tokens >= r.max_tokens:
                    sched.finish(r, RequestStatus.FINISHED_LENGTH)
                    del live[r.request_id]

    def step() -> None:
        if len(in_flight) >= depth:
            apply_oldest()
        busy = {e.request.request_id for entries, _ in in_flight for e in entries}
        held = {rid: list(live[rid].block_ids) for rid in busy if rid in live}
        share = max(1, -(-(len(sched.running) + len(sched.waiting)) // depth))
        out = sched.schedule(busy, max_seqs=share)
        assert len(out.scheduled) <= share
        assert not busy & {e.request.request_id for e in out.scheduled}
        assert not busy & {r.request_id for r in out.preempted}
        for rid, blocks in held.items():  # in-flight requests keep their blocks
            assert live[rid].block_ids == blocks
        if out:
            sched.update(out)
            in_flight.append((out.scheduled, {e.request.request_id:
                                              list(e.request.block_ids)
                                              for e in out.scheduled}))
        elif in_flight:
            apply_oldest()
        check_invariants(sched, live)

    for op in ops:
        apply_op(op, sched, live, max_len, step, ids)
    for _ in range(4000):
        if not sched.has_unfinished() and not in_flight:
            break
        step()
    assert not sched.has_unfinished() and not live
    assert kv.num_free_blocks == kv.num_blocks
