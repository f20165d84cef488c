"""Which GPU kernel moves a bf16 engine away from the float32 model: for each tiny
architecture named, the relative logit error against transformers in float32 with every
kiln op on its Triton kernel, with all on the torch reference, and with one op at a time
sent to the reference (the op whose swap removes the error is the one to look at).

    python benchmarks/bisect_kernels.py gemma2 mixtral
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from kiln import functional as KF

OPS = ["rms_norm", "silu_and_mul", "gelu", "gelu_tanh_and_mul", "layer_norm", "rotary_and_write_kv",
       "paged_attention", "moe_route", "fused_moe", "fp8_linear", "int_weight_linear"]


def main() -> None:
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
                got = sequence_logits(engine, tokens)
            finally:
                for op, fn in originals.items():
                    setattr(KF, op, fn)
            return ((got - truth).norm() / truth.norm()).item()

        hf_err = ((hf16 - truth).norm() / truth.norm()).item()
        print(f"{arch}: transformers bf16 {hf_err:.4f}; kiln all kernels {error(set()):.4f}; "
              f"all reference {error(set(OPS)):.4f}", flush=True)
        for op in OPS:
            if hasattr(KF, op):
                print(f"  {op:22s} on the reference: {error({op}):.4f}", flush=True)


if __name__ == "__main__":
    main()
