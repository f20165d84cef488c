"""The eager path's kernels compiled at engine load, not inside the first requests (a
Triton compile inside a step stalls the device for 0.1-1.4 s).

Mixed steps (prompts beside decode rows) are run with every K/V written into the scratch
block no request owns, one for each launch the attention kernels can take:
- a prompt then a decode row, for each query-tile size the prefill kernel picks;
- a decode row first, as the scheduler orders a mixed step (decode rows ahead of the
  prompts take the decode kernel: kiln.kernels.attention_prefill.paged_attention_mixed);
- prompts enough for the prefill kernel's grid to hold two programs an SM (its launch
  differs from a lone short prompt's: attention_prefill.prefill_config);
then the greedy and the random sampler. Pipeline stages run it together (each passes its
activations on; the last samples).
"""

from __future__ import annotations

import time

import torch

from kiln.kernels import num_sms
from kiln.layers import AttentionMetadata
from kiln.runtime.sampler import SamplingBatch, sample


def wide_prefill_step(model: torch.nn.Module, length: int, max_num_tokens: int,
                      device: torch.device) -> list[tuple[int, int]]:
    """Prompts of `length` tokens, as (new tokens, context) a sequence: enough for the
    prefill attention's 128-row tiles to make two programs an SM."""
    attn = model.attention_layers()[0]
    tiles = -(-length * (attn.num_heads // attn.num_kv_heads) // 128)
    count = -(-2 * num_sms(device) // (tiles * attn.num_kv_heads))
    return [(length, length)] * max(1, min(count, max_num_tokens // length))


def warmup_steps(model: torch.nn.Module, max_num_tokens: int, max_seq_len: int,
                 device: torch.device) -> list[list[tuple[int, int]]]:
    """The mixed steps run, each a list of (new tokens, context length) a sequence."""
    top = min(max_seq_len - 1, max_num_tokens - 1)
    steps = [[(n, n), (1, n + 1)] for n in sorted({min(n, top) for n in
                                                  (2, 8, 16, 32, 64, 128)})]
    steps.append([(1, top + 1), (top, top)])
    wide = wide_prefill_step(model, top, max_num_tokens, device)
    if wide != [(top, top)]:  # one prompt: the step above ran it already
        steps.append(wide)
    return steps


@torch.inference_mode()
def warm_up(runner, max_num_tokens: int, max_seq_len: int) -> float:
    """Run the steps above on a ModelRunner (any device: the CPU runs them in tests);
    seconds taken."""
    started = time.perf_counter()
    bs, scratch = runner.block_size, runner.num_blocks
    logits = None
    for seqs in warmup_steps(runner.model, max_num_tokens, max_seq_len, runner.device):
        seq_lens = [ctx for _, ctx in seqs]
        positions = [p for new, ctx in seqs for p in range(ctx - new, ctx)]
        starts = [0]
        for new, _ in seqs:
            starts.append(starts[-1] + new)
        meta = AttentionMetadata(
            slot_mapping=runner._to_device([scratch * bs + p % bs for p in positions],
                                           torch.int64),
            block_tables=torch.full((len(seqs), -(-max(seq_lens) // bs)), scratch,
                                    dtype=torch.int32, device=runner.device),
            seq_lens=runner._to_device(seq_lens, torch.int32),
            query_start_loc=runner._to_device(starts, torch.int32),
            query_starts_host=starts, seq_lens_host=seq_lens,
            max_query_len=max(new for new, _ in seqs), max_seq_len=max(seq_lens))
        ids = torch.ones(len(positions), dtype=torch.int64, device=runner.device)
        hidden = runner._forward(ids, runner._to_device(positions, torch.int64), meta)
        if hidden is not None and logits is None:  # the first prompt's last row, the decode row
            logits = runner.model.compute_logits(hidden[starts[1] - 1:starts[2]])
    if logits is not None:
        rows = logits.shape[0]

        def full(value: float, dtype: torch.dtype) -> torch.Tensor:
            return torch.full((rows,), value, dtype=dtype, device=runner.device)

        for greedy in (True, False):
            sample(logits, SamplingBatch(
                temperature=full(0.0 if greedy else 0.7, torch.float32),
                top_k=full(0 if greedy else 50, torch.int64),
                top_p=full(1.0 if greedy else 0.9, torch.float32),
                min_p=full(0.0, torch.float32), seeds=full(0, torch.int64),
                steps=full(0, torch.int64), all_greedy=greedy, penalties=None,
                banned=None, bias=None, grammar=None, wants_logprobs=True,
                max_logprobs=1))
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    return time.perf_counter() - started
