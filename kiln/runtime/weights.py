"""Loading an engine's weights onto its device (or making dummy ones there), and what the
device must support."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from kiln.config import ModelConfig
from kiln.distributed import Mapping
from kiln.errors import KilnError
from kiln.layers.quantization import QuantConfig, quantize_float_model
from kiln.models import create_model


def load_weights(model: torch.nn.Module, path: Path, device: torch.device,
                 batch_bytes: int = 1 << 30) -> tuple[list[str], list[str]]:
    """The engine file's tensors assigned to the model's parameters, about a GiB at a
    time: the model's own (uninitialised) parameters are released as their replacements
    arrive, so loading needs the model's memory plus one batch, not twice the model
    (Mixtral-8x7B: 93 GB on a 141 GB GPU). Returns (missing, unexpected) names."""
    expected = set(model.state_dict())
    loaded, unexpected = set(), []
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            batch, size = {}, 0
            names = list(f.keys())
            for i, name in enumerate(names):
                batch[name] = f.get_tensor(name)
                size += batch[name].numel() * batch[name].element_size()
                if size >= batch_bytes or i == len(names) - 1:
                    result = model.load_state_dict(batch, strict=False, assign=True)
                    unexpected += result.unexpected_keys
                    loaded.update(batch)
                    batch, size = {}, 0
    except (SafetensorError, OSError) as e:
        raise KilnError(f"{path} cannot be read ({e}); rebuild the engine") from None
    except RuntimeError as e:  # load_state_dict: shapes unlike what engine.json describes
        detail = " ".join(str(e).split())[:300]
        raise KilnError(f"{path} does not hold the model its engine.json describes "
                        f"({detail}); rebuild the engine") from None
    return sorted(expected - loaded), unexpected


def weights_mismatch(missing: list[str], unexpected: list[str]) -> KilnError:
    return KilnError(f"engine weights do not match the model: missing {missing[:3]}, "
                     f"unexpected {unexpected[:3]}; rebuild the engine")


@torch.no_grad()
def dummy_model(cfg: ModelConfig, mapping: Mapping, max_seq_len: int, dtype: torch.dtype,
                device: torch.device, quant: QuantConfig, kv_cache_dtype: str,
                seed: int = 0) -> torch.nn.Module:
    """A `--load-format dummy` engine's model: this rank's float parameters drawn on the
    device as random-weight checkpoints draw them (norm weights 1, the rest N(0, 0.02)),
    then quantized by the same code a build uses (1-byte KV scales 1.0). Nothing is read
    from disk; the peak is this rank's float model."""
    model = create_model(cfg, mapping, max_seq_len, dtype, device,
                         quant=QuantConfig("none"), kv_cache_dtype="auto")
    # One seed on every rank: replicated parameters (norms, biases) agree across ranks.
    generator = torch.Generator(device).manual_seed(seed)
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        if name.endswith("norm.weight"):
            tensor.fill_(1.0)
        else:
            tensor.normal_(0.0, 0.02, generator=generator)
    if quant.method != "none" or kv_cache_dtype != "auto":
        quantize_float_model(model, quant, kv_cache_dtype, {}, {})
        model.to(device)  # the 1-byte KV scales are made on the CPU (as a build makes them)
    return model


def check_fp8_support(quantization: str, kv_cache_dtype: str, device: torch.device) -> None:
    """FP8 tensor cores and e4m3 conversions need compute capability 8.9 (Ada, Hopper)."""
    if device.type != "cuda" or "fp8" not in (quantization, kv_cache_dtype):
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        name = torch.cuda.get_device_name(device)
        what = "weights" if quantization == "fp8" else "KV cache"
        raise KilnError(f"this engine uses FP8 ({what}), which {name} (sm_{major}{minor}) "
                        "cannot run; FP8 needs "
                        "sm_89 or newer (L4, L40S, H100, H200). Rebuild with --quantization "
                        "none / --kv-cache-dtype int8, or run on the CPU (--device cpu)")
