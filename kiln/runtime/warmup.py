"""The eager path's kernels compiled at engine load, not inside the first requests (a
Triton compile inside a step stalls the device for 0.1-2 s; after load each is logged:
kiln.runtime.profiling.loading).

Steps are run with every K/V written into the scratch block no request owns, one for each
launch the attention kernels can take:
- a prompt then a decode row, for each query-tile size the prefill kernel picks (16-128
  rows of (token, head) pairs: the prompt lengths follow each GQA group of the model);
- a decode row first, as the scheduler orders a mixed step (decode rows ahead of the
  prompts take the decode kernel: kiln.kernels.attention_prefill.paged_attention_mixed);
- short prompts enough for the prefill kernel's grid to hold two programs an SM (its
  launch differs from a few prompts': attention_prefill.prefill_config);
- decode rows alone at contexts that take each split count of the decode kernel, and 2 and
  16 of them (eager decode steps: graphs off, or prompt logprobs requested);
then the greedy and the random sampler. Pipeline stages run it together (each passes its
activations on; the last samples). A speculative draft model runs them too.
"""

from __future__ import annotations

import time

import torch

from kiln.kernels import num_sms
from kiln.layers import AttentionMetadata
from kiln.runtime.sampler import SamplingBatch, sample


def prefill_lengths(model: torch.nn.Module, top: int) -> list[int]:
    """Prompt lengths (at most top) that give the prefill kernel each query-tile size it
    picks, min(128, max(16, next_pow2(length * group))), for every GQA group of the
    model's attention layers (Qwen2.5-7B's 7, Llama-3-70B's 8 need lengths Llama-8B's 4
    does not), beside 2, 8, 16, 32, 64, 128."""
    from kiln.kernels.attention_prefill import query_tile_rows

    lengths = {2, 8, 16, 32, 64, 128}
    for group in {a.num_heads // a.num_kv_heads for a in model.attention_layers()}:
        for rows in (16, 32, 64, 128):
            n = rows // group
            if n >= 2 and query_tile_rows(n, group) == rows:
                lengths.add(n)
    return sorted({min(n, top) for n in lengths})


def wide_prefill_step(model: torch.nn.Module, max_num_tokens: int, device: torch.device
                      ) -> list[tuple[int, int]]:
    """Prompts, as (new tokens, context) a sequence, each one 128-row query tile, enough of
    them for two programs an SM: the prefill kernel's launch for a full grid, whatever
    max_num_tokens and max_seq_len allow a single prompt."""
    attn = model.attention_layers()[0]
    group = attn.num_heads // attn.num_kv_heads
    length = max(2, 64 // group + 1)  # length * group in 65 .. 128
    count = -(-2 * num_sms(device) // attn.num_kv_heads)
    return [(length, length)] * min(count, max_num_tokens // length)  # none past the budget


def decode_steps(top: int) -> list[list[tuple[int, int]]]:
    """Decode rows alone: one at contexts of 256 * 2^i tokens (the decode kernel's split
    count follows the block tables' width: 1, 2, ... 32 splits), then 2 and 16 rows."""
    from kiln.kernels.attention_decode import MAX_SPLITS, MIN_TOKENS_PER_SPLIT

    contexts = sorted({min(MIN_TOKENS_PER_SPLIT << i, top + 1)
                       for i in range(MAX_SPLITS.bit_length())})
    return [[(1, ctx)] for ctx in contexts] + [[(1, min(64, top + 1))] * n for n in (2, 16)]


def full_width_decode_steps(model: torch.nn.Module, context: int, device: torch.device,
                            max_rows: int) -> list[list[tuple[int, int]]]:
    """Decode rows at `context` tokens (block tables that wide: the decode graphs' at the
    engine's limit), one step for each split count the decode kernel takes there, with
    the fewest rows (<= max_rows) that give it. The split count follows the rows and the
    width, and long engines' splits take their own tiles (decode_config), so these are
    launches that short contexts do not compile."""
    from kiln.kernels.attention_decode import choose_num_splits

    kv_heads = sorted({layer.num_kv_heads for layer in model.attention_layers()})
    steps, seen, rows = [], set(), 1
    while rows <= max_rows:
        splits = tuple(choose_num_splits(rows, kv, context, device) for kv in kv_heads)
        if max(splits) == 1:
            break
        if splits not in seen:
            seen.add(splits)
            steps.append([(1, context)] * rows)
        rows *= 2
    return steps


def graph_width_steps(runner, max_batch_size: int, max_seq_len: int
                      ) -> list[list[tuple[int, int]]]:
    """full_width_decode_steps at the decode graphs' width (their block tables span the
    built limit: ModelRunner.capture_graphs) where it is not max_seq_len, whose width
    warmup_steps takes already; none without graphs (max_batch_size 0)."""
    built = runner.engine.build.max_seq_len
    if not max_batch_size or built == max_seq_len:
        return []
    return full_width_decode_steps(runner.model, built, runner.device, max_batch_size)


def warmup_steps(model: torch.nn.Module, max_num_tokens: int, max_seq_len: int,
                 device: torch.device) -> list[list[tuple[int, int]]]:
    """The steps run, each a list of (new tokens, context length) a sequence."""
    top = min(max_seq_len - 1, max_num_tokens - 1)
    steps = [[(n, n), (1, n + 1)] for n in prefill_lengths(model, top)]
    steps.append([(1, top + 1), (top, top)])
    steps.append(wide_prefill_step(model, max_num_tokens, device))
    steps += decode_steps(top) + full_width_decode_steps(model, max_seq_len, device,
                                                         max_num_tokens)
    return [s for s in steps if s and len(s) <= max_num_tokens]


@torch.inference_mode()
def warm_up(runner, max_num_tokens: int, max_seq_len: int,
            extra_steps: list[list[tuple[int, int]]] = (), skipped: bool = False) -> float:
    """Run the steps above (and extra_steps: kiln.runtime.precompile's graph-shaped ones)
    on a ModelRunner (any device: the CPU runs them in tests); seconds taken. skipped: the
    launches are being skipped (precompile's first pass), so no logprobs are gathered at
    the sampled ids, which no kernel wrote."""
    started = time.perf_counter()
    bs, scratch = runner.block_size, runner.num_blocks
    logits = None
    steps = warmup_steps(runner.model, max_num_tokens, max_seq_len, runner.device)
    for seqs in steps + [s for s in extra_steps if sum(n for n, _ in s) <= max_num_tokens]:
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
                banned=None, bias=None, grammar=None, wants_logprobs=not skipped,
                max_logprobs=1))
    if runner.device.type == "cuda":
        torch.cuda.synchronize(runner.device)
    return time.perf_counter() - started
