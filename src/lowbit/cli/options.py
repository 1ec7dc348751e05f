"""Command-line options generated from method config fields.

Every scalar field (bool, int, float, str) of every registered method config becomes a ``--field-name``
flag of ``lowbit quantize``; a flag given for a method that has no such field is an error naming the fields
that method does have. Adding a method adds its flags with no change here.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from lowbit.config import ConfigError
from lowbit.methods.base import MethodConfig, method_registry

__all__ = ["add_method_flags", "method_options", "build_method_config"]

_SCALARS = (bool, int, float, str)
_RESERVED = {"format", "bits", "group_size"}


def _scalar_fields(cls: type[MethodConfig]) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    out: dict[str, type] = {}
    for f in dataclasses.fields(cls):
        if f.name.startswith("_") or f.name in _RESERVED:
            continue
        t = hints.get(f.name)
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if t not in _SCALARS and len(args) == 1 and args[0] in _SCALARS:
            t = args[0]
        if t in _SCALARS:
            out[f.name] = t  # type: ignore[assignment]
    return out


def method_options(cls: type[MethodConfig]) -> dict[str, dict[str, Any]]:
    """``{field: {"type": ..., "default": ...}}`` for ``lowbit methods``."""
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return {n: {"type": t.__name__, "default": None if defaults.get(n) is dataclasses.MISSING else defaults.get(n)}
            for n, t in _scalar_fields(cls).items()}


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_method_flags(parser: argparse.ArgumentParser) -> None:
    seen: dict[str, type] = {}
    owners: dict[str, list[str]] = {}
    for kind, cls in sorted(method_registry().items()):
        for name, t in _scalar_fields(cls).items():
            owners.setdefault(name, []).append(kind)
            if name in seen and seen[name] is not t:
                t = str  # conflicting types across methods: parsed per method below
            seen[name] = t
    group = parser.add_argument_group("method options (each applies to the methods named in its help)")
    for name, t in sorted(seen.items()):
        flag = "--" + name.replace("_", "-")
        kw: dict[str, Any] = {"dest": f"opt_{name}", "default": None,
                              "help": f"{t.__name__}; for: {', '.join(owners[name])}"}
        kw["type"] = _parse_bool if t is bool else t
        group.add_argument(flag, **kw)


def build_method_config(method: str, bits: int | None, group_size: int | None,
                        args: argparse.Namespace) -> MethodConfig:
    """Build the config for ``--method`` from ``--bits``, ``--group-size`` and generated option flags."""
    reg = method_registry()
    if method not in reg:
        raise ConfigError(f"unknown method {method!r}; valid choices: {sorted(reg)}")
    cls = reg[method]
    if bits is None:
        bits = 4 if 4 in cls.bits_choices else cls.bits_choices[0]
    cls.check_bits(bits)
    per_channel = group_size == -1
    if group_size is not None and group_size <= 0 and not per_channel:
        raise ConfigError(f"--group-size {group_size} is invalid; give a positive group size, or -1 for one group "
                          "per output channel")
    cfg = cls.for_bits(bits, None if per_channel else group_size)
    if per_channel:
        if "group_size" not in {f.name for f in dataclasses.fields(cfg.format)}:
            raise ConfigError(f"method {method!r} stores {cfg.format.kind}, which has no group size")
        cfg = cfg.replace(format=cfg.format.replace(group_size=None))
    given = {k.removeprefix("opt_"): v for k, v in vars(args).items() if k.startswith("opt_") and v is not None}
    fields = _scalar_fields(cls)
    wrong = sorted(set(given) - set(fields))
    if wrong:
        valid = ", ".join("--" + f.replace("_", "-") for f in sorted(fields)) or "none"
        raise ConfigError(f"option(s) {['--' + w.replace('_', '-') for w in wrong]} do not apply to method "
                          f"{method!r}; its options: {valid}")
    changes = {}
    for k, v in given.items():
        t = fields[k]
        changes[k] = _parse_bool(v) if t is bool and isinstance(v, str) else t(v)
    return cfg.replace(**changes) if changes else cfg
