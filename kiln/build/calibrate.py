"""Calibration: run kiln's own forward over a text and record activation ranges.

Static FP8 input scales need max |x| at every linear layer's input; 1-byte KV caches need
max |k| (after rotary, as it is stored) and max |v| per KV head of every attention layer.
The model runs one sample at a time with a private KV cache, on the GPU when there is one.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kiln.checkpoint import Checkpoint
from kiln.errors import BuildError
from kiln.kernels import reference as ref
from kiln.layers import AttentionMetadata, forward_context
from kiln.layers.attention import Attention
from kiln.layers.linear import LinearBase
from kiln.layers.quantization import unfused_inputs

log = logging.getLogger(__name__)


class Stats:
    """Running maxima: input amax per linear layer (overall, and per input channel for
    SmoothQuant), (k, v) amax per KV head per attention."""

    def __init__(self, hessians: bool = False, input_rows: int = 0) -> None:
        self.input_amax: dict[str, torch.Tensor] = {}
        self.channel_amax: dict[str, torch.Tensor] = {}
        # GPTQ: sum of x^T x per linear layer (float64, on the CPU); AWQ: up to input_rows
        # input rows per linear layer, spread over the samples
        self.hessians = hessians
        self.hessian: dict[str, torch.Tensor] = {}
        self.input_rows = input_rows
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.rows_per_sample = 0
        self.kv_amax: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hooks(self, model: torch.nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        handles = []
        for name, module in model.named_modules():
            if isinstance(module, LinearBase):
                handles.append(module.register_forward_pre_hook(self._linear_hook(name)))
            elif isinstance(module, Attention):
                handles.append(module.register_forward_pre_hook(self._attention_hook(name)))
        return handles

    def _linear_hook(self, name: str):
        def hook(module: torch.nn.Module, args: tuple) -> None:
            x = args[0].detach()
            channels = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float().cpu()
            amax = channels.max()
            old = self.input_amax.get(name)
            self.input_amax[name] = amax if old is None else torch.maximum(old, amax)
            old = self.channel_amax.get(name)
            self.channel_amax[name] = channels if old is None else torch.maximum(old, channels)
            rows = x.reshape(-1, x.shape[-1])
            if self.hessians:
                h = (rows.T.double() @ rows.double()).cpu()
                self.hessian[name] = h if name not in self.hessian else self.hessian[name] + h
            if self.input_rows:
                kept = self.inputs.setdefault(name, [])
                have = sum(len(r) for r in kept)
                if have < self.input_rows:
                    step = max(1, len(rows) // max(1, self.rows_per_sample))
                    kept.append(rows[::step][:min(self.rows_per_sample,
                                                  self.input_rows - have)].float().cpu())
        return hook

    def _attention_hook(self, name: str):
        def hook(module: Attention, args: tuple) -> None:
            _, k, v, positions, cos_sin = args
            tokens, d = k.shape[0], module.head_dim
            k_rot = ref.rotary(k.reshape(tokens, -1), positions, cos_sin, d)
            k_amax = k_rot.view(tokens, -1, d).abs().amax(dim=(0, 2)).float().cpu()
            v_amax = v.reshape(tokens, -1, d).abs().amax(dim=(0, 2)).float().cpu()
            old = self.kv_amax.get(name)
            if old is not None:
                k_amax, v_amax = torch.maximum(old[0], k_amax), torch.maximum(old[1], v_amax)
            self.kv_amax[name] = (k_amax, v_amax)
        return hook


def calibration_samples(ckpt: Checkpoint, text_file: str, num_samples: int, seq_len: int,
                        vocab_size: int) -> list[list[int]]:
    """Up to num_samples consecutive windows of seq_len tokens of the text. Sources without
    a real tokenizer (random weights) take the text's UTF-8 bytes as token ids."""
    path = Path(text_file).expanduser()
    if not path.is_file():
        raise BuildError(f"calibration file {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    if text.count("\ufffd") > 0.1 * len(text):  # a model file or an archive, say
        raise BuildError(f"calibration file {path} is not UTF-8 text ("
                         f"{text.count(chr(0xfffd)) / len(text):.0%} of it does not decode); "
                         "give a plain text file in the model's language")
    unknown = None
    with tempfile.TemporaryDirectory() as tmp:
        if not ckpt.synthetic_tokenizer and ckpt.write_tokenizer(Path(tmp)):
            from kiln.tokenizer import Tokenizer

            tokenizer = Tokenizer(Path(tmp))
            ids = tokenizer.encode(text)
            unknown = tokenizer.token_to_id(tokenizer.special["unk_token"])
        else:
            ids = [b % vocab_size for b in text.encode()]
    if len(ids) < 2:
        raise BuildError(f"calibration file {path} holds fewer than 2 tokens")
    if unknown is not None and ids.count(unknown) > 0.05 * len(ids):
        log.warning("%.0f%% of calibration file %s's tokens are the unknown token: the "
                    "tokenizer does not know its script, so the scales will fit other text "
                    "badly; calibrate on text in the model's language",
                    100 * ids.count(unknown) / len(ids), path)
    return [ids[i:i + seq_len] for i in range(0, len(ids), seq_len)][:num_samples]


@torch.inference_mode()
def calibrate(model: torch.nn.Module, samples: list[list[int]], device: torch.device,
              progress: bool = True, block_size: int = 16, stats: Stats | None = None
              ) -> Stats:
    """Run every sample through `model` (moved to `device`) and return the ranges seen
    (into `stats`, which says what else to record)."""
    stats = stats or Stats()
    stats.rows_per_sample = -(-stats.input_rows // max(1, len(samples)))
    model.to(device)
    handles = stats.hooks(model)
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    kv_scales = [(a.k_scale, a.v_scale) for a in layers]
    for attn in layers:  # calibrate with a 16-bit cache, whatever the engine will hold
        attn.k_scale = attn.v_scale = None
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    # A pre-quantized FP8 checkpoint's layers would get their inputs quantized by the
    # norms before them on a GPU; the hooks read them as tensors.
    with unfused_inputs():
        try:
            for ids in tqdm(samples, desc="calibrating", unit="sample",
                            disable=None if progress else True, leave=False):
                n = len(ids)
                num_blocks = -(-n // block_size)
                for attn in layers:
                    attn.k_cache, attn.v_cache = torch.zeros(
                        2, num_blocks, block_size, attn.num_kv_heads, attn.head_dim,
                        dtype=dtype, device=device)
                i32 = dict(dtype=torch.int32, device=device)
                meta = AttentionMetadata(
                    slot_mapping=torch.arange(n, device=device),
                    block_tables=torch.arange(num_blocks, **i32)[None],
                    seq_lens=torch.tensor([n], **i32),
                    query_start_loc=torch.tensor([0, n], **i32),
                    query_starts_host=[0, n], seq_lens_host=[n], max_query_len=n, max_seq_len=n)
                with forward_context(meta):
                    model(torch.tensor(ids, device=device), torch.arange(n, device=device))
        finally:
            for h in handles:
                h.remove()
            for attn, (k_scale, v_scale) in zip(layers, kv_scales):
                attn.k_cache = attn.v_cache = torch.empty(0)
                attn.k_scale, attn.v_scale = k_scale, v_scale
    return stats
