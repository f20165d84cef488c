import torch, time
torch.manual_seed(0)
def bench(fn, reps=50):
    for _ in range(3): fn()
    ts=[]
    for r in range(5):
        t=time.perf_counter()
        for _ in range(reps): fn()
        ts.append((time.perf_counter()-t)/reps*1e6)
    return sorted(ts)[2]
G=32
for (n,k) in [(3072,576),(576,1536),(49152,576)]:
    copies = max(1, int(600e6 // (n*k*4)))  # cycle through > L3 worth of fp32 weights
    ws=[torch.randn(n,k) for _ in range(min(copies,8))]
    for M in (1,8):
        x=torch.randn(M,k)
        i=[0]
        def f32():
            i[0]=(i[0]+1)%len(ws); return x@ws[i[0]].T
        # int4: q in [0,15], scale/zero per group of 32 along K
        q=torch.randint(0,16,(n,k),dtype=torch.int32)
        try:
            packed=torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        except Exception as e:
            print("pack fails", e); break
        sz=torch.randn(k//G, n, 2)
        ps=[packed.clone() for _ in range(len(ws))]
        def i4():
            i[0]=(i[0]+1)%len(ps); return torch.ops.aten._weight_int4pack_mm_for_cpu(x, ps[i[0]], G, sz)
        try:
            print(f"N={n} K={k} M={M}: fp32 {bench(f32):8.1f} us  int4 {bench(i4):8.1f} us", flush=True)
        except Exception as e:
            print("int4 fails", e)
