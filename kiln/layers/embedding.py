"""Vocabulary embedding and LM head, split by vocabulary rows across TP ranks."""

from __future__ import annotations

import torch
from torch import nn

from kiln import functional as KF
from kiln.distributed import Mapping
from kiln.distributed.comm import tp_all_gather_last_dim, tp_all_reduce
from kiln.layers.linear import LinearBase


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, mapping: Mapping | None = None) -> None:
        super().__init__()
        self.mapping = mapping or Mapping()
        self.vocab_size = vocab_size
        tp = self.mapping.tp_size
        self.rows_per_rank = -(-vocab_size // tp)
        self.vocab_start = self.mapping.tp_rank * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, hidden_size),
                                   requires_grad=False)
        self.weight.weight_loader = self._load

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        expected = (self.vocab_size, param.shape[1])
        if tuple(loaded.shape) != expected:
            raise ValueError(f"expected shape {expected}, got {tuple(loaded.shape)}")
        part = loaded[self.vocab_start:self.vocab_start + self.rows_per_rank]
        param.data.zero_()
        param.data[: part.shape[0]].copy_(part)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.mapping.tp_size == 1:
            return self._rows(input_ids)
        local = input_ids - self.vocab_start
        valid = (local >= 0) & (local < self.rows_per_rank)
        out = self._rows(local.clamp(0, self.rows_per_rank - 1))
        return tp_all_reduce(out * valid.unsqueeze(-1).to(out.dtype), self.mapping.tp_size)

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        head = self.__dict__.get("_head")  # (not a submodule: its parameters are the head's)
        if head is None:
            return nn.functional.embedding(ids, self.weight)
        from kiln.kernels.reference import dequantize_int_weight

        offset = getattr(head, "weight_offset", None)
        flat = ids.reshape(-1)
        rows = dequantize_int_weight(head.weight[flat], head.weight_scale[flat],
                                     None if offset is None else offset[flat])
        return rows.to(self._dtype).view(*ids.shape, rows.shape[-1])

    def look_up_in(self, head: LinearLMHead) -> None:
        """Tied to an LM head whose integer storage holds this embedding's values exactly
        (a GGUF file's kept token_embd, BuildConfig.quantize_lm_head "gguf"): the float
        weight is dropped (not stored, not loaded) and a lookup dequantizes its rows."""
        self._dtype = self.weight.dtype
        del self.weight
        self.__dict__["_head"] = head


class LMHead(VocabEmbedding):
    """logits = h E^T (+ b, Phi-2), gathered over ranks and cut back to the true
    vocabulary size."""

    packs_on_cpu = True  # KF.prepack_cpu_linears

    def __init__(self, vocab_size: int, hidden_size: int, mapping: Mapping | None = None,
                 bias: bool = False) -> None:
        super().__init__(vocab_size, hidden_size, mapping)
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(self.rows_per_rank), requires_grad=False)
            self.bias.weight_loader = self._load_bias

    def _load_bias(self, param: nn.Parameter, loaded: torch.Tensor,
                   shard_id: object = None) -> None:
        if tuple(loaded.shape) != (self.vocab_size,):
            raise ValueError(f"expected shape ({self.vocab_size},), got {tuple(loaded.shape)}")
        part = loaded[self.vocab_start:self.vocab_start + self.rows_per_rank]
        param.data.zero_()
        param.data[: part.shape[0]].copy_(part)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        logits = KF.linear(hidden, self.weight, self.bias, getattr(self, "packed_weight", None))
        return full_vocabulary(logits, self.mapping, self.vocab_size)


def full_vocabulary(logits: torch.Tensor, mapping: Mapping, vocab_size: int) -> torch.Tensor:
    """A rank's logits (its slice of vocabulary rows) gathered over the TP ranks and cut
    back to the true vocabulary size (the last rank's slice is padded)."""
    return tp_all_gather_last_dim(logits, mapping.tp_size)[..., :vocab_size]


class LinearLMHead(LinearBase):
    """The LM head as a linear layer (vocabulary rows split over ranks as LMHead splits
    them), so that a quantization method holds it (BuildConfig.quantize_lm_head). Made
    from an LMHead, holding the same float weight (the embedding's, where they are tied,
    until the method replaces it with its own storage) and bias."""

    def __init__(self, head: LMHead) -> None:
        with torch.device("meta"):  # the float weight is the head's: nothing to allocate
            super().__init__(head.weight.shape[1], head.rows_per_rank, False, head.mapping)
        self.vocab_size = head.vocab_size
        self.weight = head.weight
        self.bias = head.bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return full_vocabulary(self.apply_method(hidden, self.bias), self.mapping,
                               self.vocab_size)
