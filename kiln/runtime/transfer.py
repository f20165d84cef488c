"""Host-to-device copies for per-step tensors that never stall the host.

A copy from pageable memory makes the host wait until the device has drained its queue,
which would undo overlap scheduling. Staging through pinned memory keeps it async; the
caching host allocator reuses a pinned block only once its copy has completed.
"""

from __future__ import annotations

import torch


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
