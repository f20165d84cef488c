"""Parallel-aware building blocks. Layers call ops only through `kiln.functional`."""

from kiln.layers.attention import Attention, AttentionMetadata, forward_context
from kiln.layers.embedding import LMHead, VocabEmbedding
from kiln.layers.linear import ColumnLinear, MergedColumnLinear, QKVLinear, RowLinear
from kiln.layers.mlp import GatedMLP
from kiln.layers.norm import RMSNorm
from kiln.layers.rotary import RotaryEmbedding

__all__ = [
    "Attention", "AttentionMetadata", "forward_context", "LMHead", "VocabEmbedding",
    "ColumnLinear", "MergedColumnLinear", "QKVLinear", "RowLinear", "GatedMLP", "RMSNorm",
    "RotaryEmbedding",
]
