"""Triton kernels (CUDA; the tests run them on CPU tensors through Triton's interpreter)."""

from __future__ import annotations

import functools

import torch


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device, looked up once (8 elsewhere: the
    interpreter's tests), for the launch choices that aim at a number of waves."""
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count
