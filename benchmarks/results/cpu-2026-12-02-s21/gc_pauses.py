"""A CPU throughput run timing every full (generation-2) garbage collection, split into
those before the engine was ready and those while serving; argv[1]: freeze or not."""
import gc, sys, time, json
events = []
def cb(phase, info, _t=[0.0]):
    if phase == "start": _t[0] = time.perf_counter()
    elif info["generation"] == 2: events.append((time.perf_counter() - _t[0]) * 1e3)
gc.callbacks.append(cb)
from kiln.runtime import heap
import kiln.bench.offline as offline
mark = []
real = offline.freeze_startup_heap
def marked():
    n = real()
    mark.append(len(events))  # collections so far: start-up (and the freeze's own)
    return n
offline.freeze_startup_heap = marked
from kiln.cli import main
freeze = sys.argv[1] == "freeze"
sys.argv = ["kiln", "bench", "throughput", "--random-config", "smollm2-135m", "--input-len", "16",
            "--output-len", "16", "--num-requests", "3000", "--device", "cpu", "--load-format", "dummy",
            "--max-batch-size", "256", "--out", f"/tmp/gcx/t2-{'f' if freeze else 'n'}.json"]
if not freeze:
    heap.allow_freeze = lambda: None
main()
serving = events[mark[0]:]
print(json.dumps({"freeze": freeze, "frozen": gc.get_freeze_count(),
                  "startup_ms": [round(e, 1) for e in events[:mark[0]]],
                  "serving_ms": [round(e, 1) for e in serving], "serving_total_ms": round(sum(serving), 1)}))
