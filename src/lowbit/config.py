"""Frozen, versioned configuration objects.

Every format and every method config is a frozen dataclass deriving from :class:`Config`. A subclass that
sets ``kind`` is registered under that name when it is defined, so a checkpoint's JSON can name it and
:func:`Config.from_dict` can rebuild it. Serialization is plain JSON: nested configs are written as
``{"kind": ..., "version": ..., **fields}``; tuples become lists; ``torch.dtype`` becomes its name.

Loading is strict: an unknown kind, an unknown field or a version newer than this library raises a
``ValueError`` that names the offending value and the valid choices.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Self

import torch

__all__ = ["Config", "ConfigError", "config_registry"]


class ConfigError(ValueError):
    """A configuration that cannot be built or read."""


_REGISTRY: dict[str, dict[str, type["Config"]]] = {}


def config_registry(family: str) -> dict[str, type["Config"]]:
    """Registered config classes of one family (``"format"``, ``"method"``), keyed by ``kind``."""
    return _REGISTRY.setdefault(family, {})


class Config:
    """Base of all frozen config dataclasses.

    Subclasses declare ``family`` (e.g. ``"format"``) once at the family base and ``kind`` per concrete
    class; ``version`` is bumped when the meaning of stored fields changes.
    """

    family: ClassVar[str] = "config"
    kind: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("kind"):
            reg = config_registry(cls.family)
            prev = reg.get(cls.kind)
            if prev is not None and prev.__qualname__ != cls.__qualname__:
                raise TypeError(f"{cls.family} kind {cls.kind!r} registered twice ({prev} and {cls})")
            reg[cls.kind] = cls

    # -- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "version": self.version}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.name.startswith("_"):
                continue
            out[f.name] = _encode(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        if not isinstance(d, dict):
            raise ConfigError(f"expected a JSON object for a {cls.family} config, got {type(d).__name__}")
        kind = d.get("kind")
        reg = config_registry(cls.family)
        if cls.kind and kind in (None, cls.kind):
            target: type[Config] = cls
        else:
            if kind not in reg:
                raise ConfigError(
                    f"unknown {cls.family} kind {kind!r}; valid choices: {sorted(reg)}")
            target = reg[kind]
            if not issubclass(target, cls):
                raise ConfigError(f"{cls.family} kind {kind!r} is not a {cls.__name__}")
        version = d.get("version", target.version)
        if not isinstance(version, int) or version > target.version or version < 1:
            raise ConfigError(
                f"{cls.family} {kind!r} has version {version!r}; this lowbit reads versions 1..{target.version}"
                " (upgrade lowbit to read newer files)")
        names = {f.name: f for f in dataclasses.fields(target) if not f.name.startswith("_")}  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(names) - {"kind", "version"})
        if unknown:
            raise ConfigError(
                f"unknown field(s) {unknown} in {cls.family} {kind!r}; valid fields: {sorted(names)}")
        hints = typing.get_type_hints(target)
        kwargs = {k: _decode(v, hints.get(k)) for k, v in d.items() if k in names}
        return target(**kwargs)  # type: ignore[return-value]

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


def _encode(v: Any) -> Any:
    if isinstance(v, Config):
        return v.to_dict()
    if isinstance(v, torch.dtype):
        return str(v).removeprefix("torch.")
    if isinstance(v, (tuple, list)):
        return [_encode(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _encode(x) for k, x in v.items()}
    return v


def _decode(v: Any, hint: Any) -> Any:
    if v is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else None
        origin = typing.get_origin(hint)
    if isinstance(hint, type) and issubclass(hint, Config):
        return hint.from_dict(v)
    if hint is torch.dtype:
        dt = getattr(torch, str(v), None)
        if not isinstance(dt, torch.dtype):
            raise ConfigError(f"unknown dtype {v!r}")
        return dt
    if origin is tuple and isinstance(v, list):
        args = typing.get_args(hint)
        inner = args[0] if args else None
        return tuple(_decode(x, inner) for x in v)
    return v
