"""Which GPU kernel moves a bf16 engine away from the float32 model: for each tiny
architecture named, the relative logit error against transformers in float32 with every
kiln op on its Triton kernel, with all on the torch reference, and with one op at a time
sent to the reference (the op whose swap removes the error is the one to look at).

    python benchmarks/bisect_kernels.py gemma2 mixtral
    python benchmarks/bisect_kernels.py --modules gemma2   # the same engine on CPU and GPU:
        # every module's output compared, in the order they ran
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from kiln import functional as KF

OPS = ["rms_norm", "silu_and_mul", "gelu", "gelu_tanh_and_mul", "layer_norm", "rotary_and_write_kv",
       "paged_attention", "moe_route", "fused_moe", "fp8_linear", "int_weight_linear"]


def compare_modules(arch: str, root: Path) -> None:
    """One bf16 engine on the CPU (torch reference ops) and on the GPU: the relative
    difference of each module's output, in execution order."""
    from kiln.build import build
    from kiln.config import BuildConfig
    from kiln.eval import sequence_logits
    from kiln.runtime.engine import LLMEngine, RuntimeConfig
    from tests.conftest import make_hf_model

    make_hf_model(arch, root / arch)
    engine_dir = build(root / arch, root / f"{arch}-bf16", BuildConfig(
        dtype="bfloat16", max_seq_len=512), progress=False)
    tokens = list(range(3, 200))
    outputs = {}
    for device in ("cpu", "cuda"):
        engine = LLMEngine(engine_dir, RuntimeConfig(device=device, cuda_graphs=False))
        seen: list[tuple[str, torch.Tensor]] = []
        hooks = []
        for name, module in engine.runner.model.named_modules():
            def hook(mod, args, out, name=name):
                t = out[0] if isinstance(out, tuple) else out
                if isinstance(t, torch.Tensor) and t.is_floating_point():
                    seen.append((name, t.detach().float().cpu()))  # noqa: B023 (called at once)
            hooks.append(module.register_forward_hook(hook))
        logits = sequence_logits(engine, tokens)
        for h in hooks:
            h.remove()
        outputs[device] = (seen, logits)
    (cpu, cpu_logits), (gpu, gpu_logits) = outputs["cpu"], outputs["cuda"]
    print(f"{arch}: logits cpu vs gpu {((gpu_logits - cpu_logits).norm() / cpu_logits.norm()):.4f}")
    for (name, a), (_, b) in zip(cpu, gpu):
        if a.shape == b.shape:
            rel = ((a - b).norm() / a.norm().clamp_min(1e-30)).item()
            print(f"  {rel:9.5f}  {name} {tuple(a.shape)}")


def main() -> None:
    if sys.argv[1] == "--modules":
        root = Path(tempfile.mkdtemp())
        for arch in sys.argv[2:]:
            compare_modules(arch, root)
        return
    from kiln.build import build
    from kiln.config import BuildConfig
    from kiln.eval import sequence_logits
    from kiln.runtime.engine import LLMEngine, RuntimeConfig
    from tests.conftest import make_hf_model

    root = Path(tempfile.mkdtemp())
    triton_on = KF._triton
    for arch in sys.argv[1:]:
        hf = make_hf_model(arch, root / arch)
        engine_dir = build(root / arch, root / f"{arch}-bf16", BuildConfig(
            dtype="bfloat16", max_seq_len=512), progress=False)
        tokens = list(range(3, 200))
        ids = torch.tensor([tokens], device="cuda")
        with torch.no_grad():
            truth = hf.to("cuda")(ids).logits[0].float().cpu()
            hf16 = hf.to(torch.bfloat16)(ids).logits[0].float().cpu()
        engine = LLMEngine(engine_dir, RuntimeConfig(device="cuda", cuda_graphs=False))

        def error(reference: set[str]) -> float:
            originals = {op: getattr(KF, op) for op in reference if hasattr(KF, op)}

            def wrap(op, fn):
                def call(*args, **kwargs):
                    KF._triton = lambda x: False
                    try:
                        return fn(*args, **kwargs)
                    finally:
                        KF._triton = triton_on
                return call

            for op, fn in originals.items():
                setattr(KF, op, wrap(op, fn))
            try:
                got = sequence_logits(engine, tokens)  # noqa: B023 (called at once)
            finally:
                for op, fn in originals.items():
                    setattr(KF, op, fn)
            return ((got - truth).norm() / truth.norm()).item()  # noqa: B023 (called at once)

        hf_err = ((hf16 - truth).norm() / truth.norm()).item()
        print(f"{arch}: transformers bf16 {hf_err:.4f}; kiln all kernels {error(set()):.4f}; "
              f"all reference {error(set(OPS)):.4f}", flush=True)
        for op in OPS:
            if hasattr(KF, op):
                print(f"  {op:22s} on the reference: {error({op}):.4f}", flush=True)


if __name__ == "__main__":
    main()
