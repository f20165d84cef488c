from kiln.distributed.mapping import Mapping

__all__ = ["Mapping"]
