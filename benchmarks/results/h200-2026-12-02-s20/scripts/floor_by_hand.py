h, I, L, q, kv, V = 4096, 14336, 32, 4096, 1024, 128256
layers = L * 2 * (h * (q + 2 * kv) + q * h + 3 * h * I)
head = 2 * V * h
def floor(n, inp, out, bw, rate, weights, kvb, batch=512):
    attn = L * 2 * 32 * 128 * inp**2
    pre = n * (inp * layers + head + attn) / rate
    dec, left = 0.0, n
    while left > 0:
        r = min(left, batch); dec += (out - 1) * max(weights / bw, r * (layers + head) / rate); left -= r
    s = out - 1
    kvs = n * (s * inp + s * (s + 1) / 2) * kvb / bw
    t = pre + dec + kvs
    return t, pre, dec, kvs, n * out / t
bw = 4264e9
wb = (L * (h * (q + 2 * kv) + q * h + 3 * h * I) + L * 2 * h + h + V * h) * 2
wf = L * (h * (q + 2 * kv) + q * h + 3 * h * I) * 1 + (L * 2 * h + h + V * h) * 2
for name, rate, w, kvb, n, i, o, meas in [
    ("bf16 1k", 830e12, wb, 131072, 1000, 1000, 1000, 9880), ("fp8 1k", 1280e12, wf, 65536, 1000, 1000, 1000, 14141),
    ("bf16 128", 830e12, wb, 131072, 1000, 128, 128, 17610), ("fp8 128", 1280e12, wf, 65536, 1000, 128, 128, 23491)]:
    t, pre, dec, kvs, tok = floor(n, i, o, bw, rate, w, kvb)
    print(f"{name}: floor {tok:.0f} tok/s ({t:.1f} s: prefill {pre:.1f}, decode GEMMs {dec:.1f}, KV {kvs:.1f}); measured {meas} = {100*meas/tok:.1f}%")
