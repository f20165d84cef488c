"""Paged KV cache manager: hands out block ids, counts references, reuses full-block prefixes.

It knows nothing of tensors. A block holds `block_size` consecutive tokens of one
sequence. A full block is identified by a hash chained over every token before it, so
two requests with the same prefix map to the same blocks. Blocks nobody references go
to a free queue in LRU order but keep their hash, so a later request can still reuse
them until they are handed out again.

With a sliding window on every layer, blocks wholly before the window of a request's
next token are released as the request advances (it keeps their place in its block list,
so positions still map to blocks; the kernels never read them).

With attention sinks (kiln.runtime.streaming) a sequence holds at most its sink blocks,
its window blocks and the block being filled: allocating past that evicts the oldest
window block from its block list (request.num_evicted_tokens counts what went).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from kiln.errors import KilnError
from kiln.runtime.request import PLACEHOLDER, Request
from kiln.runtime.streaming import StreamingConfig

# Keys before a window that the attention kernels' tiles may still touch (masked): the
# prefill kernel starts at the window's first key rounded down to its BLOCK_N (<= 64).
WINDOW_TILE_MARGIN = 64


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 sliding_window: int | None = None, streaming: StreamingConfig | None = None):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.streaming = streaming
        # Most tokens one step may add to a sequence (None: no limit of the cache's).
        self.max_chunk = streaming.max_chunk if streaming is not None else None
        # Blocks cached under attention sinks hold keys of evicting sequences: no reuse.
        self.enable_prefix_caching = enable_prefix_caching and streaming is None
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # hash -> block id
        # Unreferenced blocks, least recently freed first; ids are handed out from the front.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.num_cache_queries = 0  # tokens looked up
        self.num_cache_hits = 0  # tokens found

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.num_cache_hits / self.num_cache_queries if self.num_cache_queries else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hashes(self, request: Request, num_blocks: int) -> list[int]:
        """Chained hashes of the request's first num_blocks full blocks, computed once each
        and kept on the request (they depend only on its tokens, which never change, and
        on whether LongRoPE's long factors computed them)."""
        hashes, bs = request.block_hashes, self.block_size
        root = int(request.rope_long)
        while len(hashes) < num_blocks:
            i = len(hashes)
            hashes.append(hash((hashes[-1] if hashes else root,
                                tuple(request.token_ids[i * bs:(i + 1) * bs]))))
        return hashes[:num_blocks]

    def match_prefix(self, request: Request) -> list[int]:
        """Cached blocks holding a prefix of the request's tokens (no refs taken).

        At least one token is always left to compute: its logits start the generation.
        """
        if not self.enable_prefix_caching or request.prompt_logprobs is not None:
            return []  # prompt logprobs need every prompt position computed
        max_blocks = (request.num_tokens - 1) // self.block_size
        found = []
        for h in self._hashes(request, max_blocks):
            block = self.cached.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def count_lookup(self, request: Request, num_cached: int) -> None:
        """The hit rate's counts, once a request is admitted with num_cached tokens found
        (not at every lookup: a request waiting for room looks again each step)."""
        if self.enable_prefix_caching and request.prompt_logprobs is None:
            self.num_cache_queries += request.num_tokens
            self.num_cache_hits += num_cached

    def can_allocate(self, num_blocks: int, reuse: Sequence[int] = ()) -> bool:
        # Reused blocks sitting in the free queue are taken out of it, not allocated.
        reclaimed = sum(1 for b in reuse if self.ref_counts[b] == 0)
        return num_blocks + reclaimed <= self.num_free_blocks

    def allocate(self, request: Request, num_tokens: int, reuse: Sequence[int] = ()) -> bool:
        """Give the request blocks for its first `num_tokens` tokens; False if they don't fit.

        `reuse` (only for a request holding no blocks yet) are prefix blocks from
        `match_prefix` to share instead of recomputing.
        """
        if self.sliding_window is not None:
            self.release_outside_window(request)
        if self.streaming is not None:
            self._evict_for_sinks(request, num_tokens)
        needed = self.blocks_needed(num_tokens - request.num_evicted_tokens) - \
            len(request.block_ids) - len(reuse)
        if needed <= 0 and not reuse:  # a decode step inside its last block: most steps
            return True
        if needed > 0 and not self.can_allocate(needed, reuse):
            return False
        for block in reuse:
            if self.ref_counts[block] == 0:
                del self.free_queue[block]
            self.ref_counts[block] += 1
        request.block_ids.extend(reuse)
        for _ in range(max(needed, 0)):
            block, _ = self.free_queue.popitem(last=False)
            if self.block_hash[block] is not None:  # evict its old contents
                self.cached.pop(self.block_hash[block], None)
                self.block_hash[block] = None
            self.ref_counts[block] = 1
            request.block_ids.append(block)
        return True

    def commit(self, request: Request) -> None:
        """Register the request's computed full blocks for reuse by later requests."""
        if not self.enable_prefix_caching:
            return
        known = request.num_computed_tokens
        if request.token_ids[-1] == PLACEHOLDER:  # a block holding it is not known yet
            known = min(known, len(request.token_ids) - 1)
        num_full = min(known // self.block_size, len(request.block_ids))
        if num_full <= request.num_committed_blocks:  # no block filled since: most steps
            return
        hashes = self._hashes(request, num_full)
        for i in range(request.num_committed_blocks, num_full):
            block, h = request.block_ids[i], hashes[i]
            if self.block_hash[block] is None and h not in self.cached:
                self.block_hash[block] = h
                self.cached[h] = block
        request.num_committed_blocks = max(request.num_committed_blocks, num_full)

    def truncate(self, request: Request, num_tokens: int) -> None:
        """Release the request's blocks past its first num_tokens tokens (speculative
        decoding's rollback: those held only rejected drafts, never committed)."""
        keep = self.blocks_needed(num_tokens - request.num_evicted_tokens)
        for block in reversed(request.block_ids[keep:]):
            self._unref(block)
        del request.block_ids[keep:]

    def _unref(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_queue[block] = None

    def max_blocks(self, num_tokens: int) -> int:
        """Blocks a sequence of num_tokens tokens holds (attention sinks cap it)."""
        needed = self.blocks_needed(num_tokens)
        return min(needed, self.streaming.capacity_blocks) if self.streaming else needed

    def _evict_for_sinks(self, request: Request, num_tokens: int) -> None:
        """Attention sinks: drop the oldest window blocks until num_tokens fit the
        sequence's capacity (the steps in flight have their block tables already; a freed
        block is rewritten only by a later step, in stream order)."""
        s = self.streaming
        if s is None:
            return
        while self.blocks_needed(num_tokens - request.num_evicted_tokens) > \
                s.capacity_blocks and len(request.block_ids) > s.sink_blocks + 1:
            self._unref(request.block_ids.pop(s.sink_blocks))
            request.num_evicted_tokens += self.block_size

    def release_outside_window(self, request: Request) -> None:
        """Drop the request's references to blocks no query from its next token on can see
        (every layer windowed): keys < next position - window + 1 - WINDOW_TILE_MARGIN."""
        if self.sliding_window is None:
            return
        first_needed = request.num_computed_tokens - self.sliding_window + 1 - WINDOW_TILE_MARGIN
        outside = min(max(first_needed, 0) // self.block_size, len(request.block_ids))
        for block in request.block_ids[request.num_released_blocks:outside]:
            self._unref(block)
        request.num_released_blocks = max(request.num_released_blocks, outside)

    @staticmethod
    def num_held_blocks(request: Request) -> int:
        return len(request.block_ids) - request.num_released_blocks

    def free(self, request: Request) -> None:
        """Drop the request's references; tail blocks go to the queue first (evicted first)."""
        for block in reversed(request.block_ids[request.num_released_blocks:]):
            self._unref(block)
        request.block_ids = []
        request.num_committed_blocks = 0
        request.num_released_blocks = 0
        request.num_evicted_tokens = 0


def auto_num_blocks(bytes_per_block: int, device: torch.device, memory_fraction: float,
                    cpu_bytes: int, max_batch_size: int, max_seq_len: int,
                    block_size: int) -> int:
    """The KV pool's size: memory_fraction of the GPU memory free now (cpu_bytes on the
    CPU), no more than max_batch_size full-length requests need, at least one (a KilnError
    when even one does not fit in the memory free now)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * memory_fraction)
    else:
        free, budget = _cpu_available(), cpu_bytes
    per_request = -(-max_seq_len // block_size)
    if free is not None and (per_request + 1) * bytes_per_block > free:
        fits = max(free // bytes_per_block - 1, 0) * block_size
        where = "the GPU" if device.type == "cuda" else "this machine"
        raise KilnError(
            f"one request of max_seq_len={max_seq_len} needs {_gb(per_request * bytes_per_block)}"
            f" of KV cache and {where} has {_gb(free)} free: lower --max-seq-len (a runtime "
            f"setting; about {fits} tokens fit)")
    return max(min(budget // bytes_per_block, max_batch_size * per_request), per_request)


def _cpu_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"
