from lowbit.nn.linear import QuantLinear

__all__ = ["QuantLinear"]
