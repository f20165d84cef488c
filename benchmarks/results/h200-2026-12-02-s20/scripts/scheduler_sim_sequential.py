import argparse, sys
sys.path.insert(0, "/work/main")
from kiln.runtime.kv_cache import KVCacheManager
from kiln.runtime.request import Request, RequestStatus, SamplingParams
from kiln.runtime.scheduler import Scheduler

def run(policy, blocks=57247, n=1000, inp=1000, out=1000, B=512, T=16384, H=None):
    kv = KVCacheManager(blocks, 16, enable_prefix_caching=False)
    s = Scheduler(kv, B, T, "max_utilization" if policy in ("max_utilization", "lookahead") else policy)
    if policy == "lookahead":
        def adm(request, num_tokens, reuse, s=s):
            # reserve for every running request to grow until the soonest one finishes
            rem = [r.max_tokens - r.num_output_tokens for r in s.running]
            h = min(rem) if rem else 0
            if H is not None:
                h = max(h, H)
            need = 0
            for r in s.running:
                grow = min(h, r.max_tokens - r.num_output_tokens)
                need += max(kv.max_blocks(r.num_tokens + grow) - len(r.block_ids), 0)
            own = kv.max_blocks(request.num_prompt_tokens + min(h, request.max_tokens)) - len(reuse)
            return need + own <= kv.num_free_blocks
        s._admissible = adm
    params = SamplingParams(max_tokens=out, ignore_eos=True)
    for i in range(n):
        s.add(Request(str(i), [5 + (i * 7 + j) % 1000 for j in range(inp)], params, out))
    steps = pre = rows_total = 0; t = 0.0
    P, W, KVB, BW, R = 7.5e9, 15.0e9, 131072, 4.264e12, 8.3e14
    while s.has_unfinished():
        o = s.schedule()
        steps += 1
        dec = [e.num_new_tokens == 1 and e.request.num_computed_tokens >= e.request.num_prompt_tokens for e in o.scheduled]
        rows = sum(dec); new = sum(e.num_new_tokens for e, d in zip(o.scheduled, dec) if not d)
        kvt = sum(e.request.num_computed_tokens + 1 for e, d in zip(o.scheduled, dec) if d)
        t += max(W / BW, (new + rows) * 2 * P / R) + kvt * KVB / BW
        pre += new; rows_total += rows
        s.update(o)
        for e in o.scheduled:
            r = e.request
            if e.sample:
                r.token_ids.append(7)
                if r.num_output_tokens >= r.max_tokens:
                    s.finish(r, RequestStatus.FINISHED_LENGTH)
    print(f"{policy:20s} H={H} steps {steps} preempt {s.num_preemptions} recomputed {pre - n*inp} batch {rows_total/steps:.1f} model {t:.1f} s {n*out/t:.0f} tok/s")

for p in ("max_utilization", "guaranteed_no_evict", "lookahead"):
    run(p)
for H in (50, 100, 200, 400):
    run("lookahead", H=H)
