"""Whether a build fits in this machine's memory, checked before it starts.

A build holds one rank's weights whole in memory (the model it loads them into; safetensors
then writes them from there), one rank after another. A rank that cannot fit is refused
up front with what it needs, instead of the OOM killer ending the build (exit 137, no
message) after minutes of work.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kiln.errors import BuildError

GB = 1e9


class RankBytes(int):
    """A rank's bytes (an int), with `tables`: how many of them are buffers that are not
    weights (rotary tables, which grow with --max-seq-len)."""

    tables: int

    def __new__(cls, total: int, tables: int) -> RankBytes:
        made = super().__new__(cls, total)
        made.tables = tables
        return made


def rank_bytes(cfg, build_cfg, dtype: torch.dtype, quant, kv_cache_dtype: str) -> RankBytes:
    """The largest rank's parameters and buffers as the build loads them (the model built
    on the meta device: no memory). Tensor-parallel ranks are alike; of the pipeline
    stages, the first (embeddings) or the last (LM head) is the largest."""
    from kiln.distributed import Mapping
    from kiln.models import create_model

    def size(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())

    world = build_cfg.tp_size * build_cfg.pp_size
    largest = RankBytes(0, 0)
    for rank in sorted({0, world - 1}):
        mapping = Mapping(world, rank, build_cfg.tp_size, build_cfg.pp_size)
        model = create_model(cfg, mapping, build_cfg.max_seq_len, dtype, device="meta",
                             quant=quant, kv_cache_dtype=kv_cache_dtype)
        stored = {id(t) for t in model.state_dict(keep_vars=True).values()}
        tables = size(t for t in model.buffers() if id(t) not in stored)  # not persistent
        total = size((*model.parameters(), *model.buffers()))
        largest = max(largest, RankBytes(total, tables))
    return largest


def available_bytes() -> int | None:
    """What this process can still allocate: MemAvailable plus free swap, capped by its
    cgroup's (v2) limit; None where neither can be read (not Linux)."""
    try:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info[key] = int(value.split()[0]) * 1024
        room = info["MemAvailable"] + info.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        return None
    cgroup = _cgroup_room()
    return room if cgroup is None else min(room, cgroup)


def _cgroup_room() -> int | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        path = next(line[3:] for line in lines if line.startswith("0::"))
        folder = Path("/sys/fs/cgroup") / path.lstrip("/")
        limit = (folder / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((folder / "memory.current").read_text())
        stat = dict(line.split() for line in (folder / "memory.stat").read_text().splitlines())
        return int(limit) - used + int(stat.get("inactive_file", 0))  # page cache goes first
    except (OSError, StopIteration, ValueError):
        return None


def check_fits(needed: int, dtype: torch.dtype, build_cfg, source: Path,
               available: int | None = None) -> None:
    """A BuildError when `needed` bytes (one rank's weights) exceed what is available."""
    available = available_bytes() if available is None else available
    if available is None or needed <= available:
        return
    world = build_cfg.tp_size * build_cfg.pp_size
    what = f"{'one rank' if world > 1 else 'the model'}'s weights in " \
        f"{str(dtype).removeprefix('torch.')}"
    tables = getattr(needed, "tables", 0)
    if tables * 2 > needed:  # the position tables, not the weights: --max-seq-len
        raise BuildError(
            f"this build needs at least {needed / GB:.1f} GB of memory, {tables / GB:.1f} GB "
            f"of it the rotary tables for --max-seq-len {build_cfg.max_seq_len}, but "
            f"{available / GB:.1f} GB is available; build with a smaller --max-seq-len")
    ways = ["a smaller --config"] if str(source).startswith("random:") else []
    if dtype == torch.float32:
        ways.append("--dtype bfloat16 (half the bytes)")
    ways.append("--tp-size N (a build holds one rank's 1/N at a time)")
    raise BuildError(f"this build needs at least {needed / GB:.1f} GB of memory ({what}, "
                     f"held whole before they are written) but {available / GB:.1f} GB is "
                     f"available; free memory, or build with {', '.join(ways[:-1])}"
                     f"{' or ' if len(ways) > 1 else ''}{ways[-1]}")
