"""How methods plug in: a frozen config per method, registered by ``kind``.

A method config says how to choose the bits for one weight and names the format that stores them
(``GPTQConfig(format=IntAffine(bits=4, group_size=128))``). It declares the calibration statistics it needs
in ``stats``; calibration-free methods declare none and are applied layer by layer. The math lives in the
method's ``core.py``; its ``api.py`` holds the config and :meth:`MethodConfig.quantize_weight`.

Statistic names (what :mod:`lowbit.calibration` collects per Linear layer, ``X: (tokens, in_features)``):
``hessian`` (2·XᵀX/n, fp32 running mean), ``act_absmax`` (max |X| per input column), ``act_mean_abs``
(mean |X| per input column), ``act_sq_mean`` (mean X² per input column, llama.cpp's importance), ``fisher``
(mean squared gradient of the loss per weight).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from lowbit.config import Config, ConfigError, config_registry
from lowbit.formats.base import Format, QuantizedTensor

__all__ = ["MethodConfig", "method_registry", "get_method", "STAT_NAMES"]

STAT_NAMES = ("hessian", "act_absmax", "act_mean_abs", "act_sq_mean", "fisher")


def method_registry() -> dict[str, type["MethodConfig"]]:
    """Every registered method config class, keyed by its ``kind`` (the CLI's ``--method`` name)."""
    import lowbit.methods  # noqa: F401  (importing the package registers the built-in methods)

    return config_registry("method")


def get_method(name: str) -> type["MethodConfig"]:
    reg = method_registry()
    if name not in reg:
        raise ConfigError(f"unknown method {name!r}; valid choices: {sorted(reg)}")
    return reg[name]


@dataclass(frozen=True)
class MethodConfig(Config):
    """Base of every method config.

    Class attributes:
        stats: calibration statistics the method needs (subset of ``STAT_NAMES``); empty means
            calibration-free.
        bits_choices: bit widths the method supports (used by the CLI and the demo).
        summary: one line for ``lowbit methods``.
        option_stats: statistics an option adds, keyed by the option as the CLI writes it (``{"--gptq":
            ("hessian",)}``): a config with that option set declares them on the instance.
        quick_options: cheaper settings of the method's own options for quick runs (``lowbit demo`` uses
            them unless ``--full``); empty when the defaults are already cheap. Each method says in its
            config's docstring what they cost.
    """

    family: ClassVar[str] = "method"
    stats: ClassVar[tuple[str, ...]] = ()
    bits_choices: ClassVar[tuple[int, ...]] = (2, 3, 4, 5, 6, 7, 8)
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    option_stats: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    quick_options: ClassVar[Mapping[str, Any]] = {}

    format: Format

    def quantize_weight(self, W: torch.Tensor, stats: Mapping[str, torch.Tensor] | None = None) -> QuantizedTensor:
        """Quantize one weight ``W: (out_features, in_features)`` given the statistics it declared."""
        raise NotImplementedError

    @classmethod
    def for_bits(cls, bits: int, group_size: int | None = None, **options: Any) -> "MethodConfig":
        """The method's recommended config at ``bits`` (``group_size`` None: the method's default).

        Raises ``ValueError`` naming the supported widths if ``bits`` is not one of them.
        """
        raise NotImplementedError

    @classmethod
    def check_bits(cls, bits: int) -> None:
        if bits not in cls.bits_choices:
            raise ConfigError(f"method {cls.kind!r} does not support bits={bits}; valid choices: {list(cls.bits_choices)}")

    def describe(self) -> str:
        return f"{self.kind}({self.format.kind})"
