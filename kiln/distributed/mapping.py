"""Where a rank sits in the tensor/pipeline-parallel grid, derived by arithmetic."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.errors import BuildError


@dataclass(frozen=True)
class Mapping:
    """Ranks are laid out pipeline-major: rank = pp_rank * tp_size + tp_rank."""

    world_size: int = 1
    rank: int = 0
    tp_size: int = 1
    pp_size: int = 1

    def __post_init__(self) -> None:
        if self.tp_size * self.pp_size != self.world_size:
            raise BuildError(
                f"tp_size ({self.tp_size}) x pp_size ({self.pp_size}) must equal "
                f"world_size ({self.world_size})")
        if not 0 <= self.rank < self.world_size:
            raise BuildError(f"rank {self.rank} is outside world_size {self.world_size}")

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_first_pp_rank(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_rank(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def prev_pp_rank(self) -> int | None:
        """The rank (same TP rank) of the stage before this one; None on the first."""
        return None if self.is_first_pp_rank else self.rank - self.tp_size

    @property
    def next_pp_rank(self) -> int | None:
        """The rank (same TP rank) of the stage after this one; None on the last."""
        return None if self.is_last_pp_rank else self.rank + self.tp_size

    def tp_group_ranks(self) -> list[int]:
        start = self.pp_rank * self.tp_size
        return list(range(start, start + self.tp_size))

    def pp_layers(self, num_layers: int) -> range:
        """The decoder layers this rank's pipeline stage owns (earlier stages get extra)."""
        base, extra = divmod(num_layers, self.pp_size)
        start = self.pp_rank * base + min(self.pp_rank, extra)
        return range(start, start + base + (1 if self.pp_rank < extra else 0))
