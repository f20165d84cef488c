"""Parallel-aware building blocks. Layers call ops only through `kiln.functional`."""

from kiln.layers.attention import Attention, AttentionMetadata, forward_context
from kiln.layers.embedding import LMHead, VocabEmbedding
from kiln.layers.linear import ColumnLinear, MergedColumnLinear, QKVLinear, RowLinear
from kiln.layers.mlp import GatedMLP, PlainMLP
from kiln.layers.norm import LayerNorm, RMSNorm, make_norm
from kiln.layers.rotary import RotaryEmbedding

__all__ = [
    "Attention", "AttentionMetadata", "forward_context", "LMHead", "VocabEmbedding",
    "ColumnLinear", "MergedColumnLinear", "QKVLinear", "RowLinear", "GatedMLP", "PlainMLP",
    "RMSNorm", "LayerNorm", "make_norm", "RotaryEmbedding",
]
