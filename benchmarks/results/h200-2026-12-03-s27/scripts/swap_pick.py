"""27th session: pick the fastest swapped-operand FP8 launch per Llama-3.1-8B shape from
`fp8_gemm.py --grid --swap` JSON (M = 1, and the same launch's time at M = 16), print the
table against the current gemm_config launch, and (with `bench ...` after the JSON) run
kiln's CLI with gemm_config patched to those launches for M <= 16.

    python swap_pick.py a.json,b.json                  # the table
    python swap_pick.py a.json,b.json bench latency ...  # kiln bench with the picks
(A shape is picked only where the swapped launch beats the current one.)
"""
import json
import sys

from kiln.kernels import fp8

rows = [r for path in sys.argv[1].split(",") for r in json.load(open(path))["results"]]
picks = {}
for (N, K) in sorted({(r["N"], r["K"]) for r in rows}):
    at = {M: {r["method"]: r for r in rows if (r["N"], r["K"], r["M"]) == (N, K, M)}
          for M in (1, 16)}
    cur = {M: next((r for r in at[M].values() if r["current"]), None) for M in (1, 16)}
    swaps = [m for m in at[1] if m.endswith("S")]
    if not swaps:
        continue
    # the launch with the best sum of M = 1 and M = 16 times (one launch for all M <= 16)
    best = min(swaps, key=lambda m: at[1][m]["us"] + at[16].get(m, {"us": 1e9})["us"])
    if cur[1] and cur[16] and at[1][best]["us"] + at[16].get(best, {"us": 1e9})["us"] < \
            cur[1]["us"] + cur[16]["us"]:
        picks[(N, K)] = best[5:]
    print(f"{N}x{K}: current " + " / ".join(f"{cur[M]['us']:.2f}" for M in (1, 16) if cur[M])
          + f" us; swap {best[5:]} " + " / ".join(f"{at[M][best]['us']:.2f}" for M in (1, 16)
                                                   if best in at[M]) + " us (M = 1 / 16)",
          flush=True)


def parse(tag: str) -> fp8.GemmConfig:
    """'16x64x256w4s6k2LS' -> GemmConfig (the fields fp8_gemm.py's swap grid varies)."""
    import re
    m = re.fullmatch(r"(\d+)x(\d+)x(\d+)w(\d+)s(\d+)(?:k(\d+))?L?S", tag)
    return fp8.GemmConfig(int(m[1]), int(m[2]), int(m[3]), int(m[4]), int(m[5]), pdl=True,
                          split_k=int(m[6] or 1), swap=True)


if len(sys.argv) > 2:
    chosen = {nk: parse(t) for nk, t in picks.items()}
    original = fp8.gemm_config

    def patched(M, N, K):
        return chosen[(N, K)] if M <= 16 and (N, K) in chosen else original(M, N, K)

    fp8.gemm_config = patched
    from kiln.cli import main
    sys.exit(main(sys.argv[2:]))
