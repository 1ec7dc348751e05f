"""RTN: round-to-nearest into any format, with the format's own min/max (or absmax) parameters."""

from lowbit.methods.rtn.api import RTNConfig

__all__ = ["RTNConfig"]
