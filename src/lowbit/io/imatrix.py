"""Importance matrices: llama.cpp's per-input-column mean of squared activations, collected and stored.

For a weight ``W: (out, in)`` fed activations ``X: (tokens, in)``, the importance of column ``j`` is
``mean_t X[t, j]²`` (lowbit's calibration statistic ``act_sq_mean``; llama.cpp ``tools/imatrix``, PR #4861).
The GGML quantizers weight their searches by it (:func:`lowbit.formats.ggml.quantize_raw`).

Files (both read and written, keyed by GGUF tensor names such as ``blk.0.attn_q.weight``):

* GGUF imatrix (current llama.cpp): ``general.type = "imatrix"``, ``imatrix.datasets`` (string array),
  ``imatrix.chunk_count``/``imatrix.chunk_size`` (UINT32), and per tensor ``<name>.in_sum2`` (F32, Σ x² over
  tokens, numpy shape ``(1, in)``) and ``<name>.counts`` (F32 token count, shape ``(1, 1)``).
* legacy ``.dat``: ``int32 n``, then per entry ``int32 len, name, int32 ncall, int32 nval, float32[nval]``
  (values = mean · ncall), then ``int32 last_call, int32 len, dataset name``.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np
import torch

from lowbit.io.atomic import atomic_file
from lowbit.io.gguf_writer import GGUFValueType, GGUFWriter

__all__ = ["Imatrix", "collect_act_sq_mean", "collect_imatrix", "read_imatrix", "write_imatrix_gguf",
           "write_imatrix_dat"]

logger = logging.getLogger(__name__)


@dataclass
class Imatrix:
    """Accumulated squared activations per tensor.

    Attributes:
        sums: GGUF tensor name → ``Σ_tokens x²`` per input column, float32 ``(in,)``.
        counts: name → number of tokens summed.
        chunk_count: calibration chunks processed.
        chunk_size: tokens per chunk (0 if unknown).
        datasets: names of the calibration data.
    """

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    chunk_count: int = 0
    chunk_size: int = 0
    datasets: tuple[str, ...] = ()

    def names(self) -> list[str]:
        return list(self.sums)

    def importance(self, name: str) -> np.ndarray:
        """``in_sum2 / count`` (llama-quantize divides by 1 when the count is 0)."""
        c = float(self.counts.get(name, 0.0))
        return (self.sums[name] / np.float32(c if c > 0 else 1.0)).astype(np.float32)

    def __len__(self) -> int:
        return len(self.sums)


# ---------------------------------------------------------------------------------------------- collection
def collect_act_sq_mean(model: torch.nn.Module, batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
                        include: tuple[type, ...] = (torch.nn.Linear,)) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Run ``model`` on ``batches`` and collect ``Σ x²`` per input column of every Linear, with forward hooks.

    Args:
        model: any module; ``batches`` are passed as ``model(batch)`` (tensors, e.g. input ids) or
            ``model(**batch)`` (mappings).
        include: module types to hook (lowbit ``QuantLinear`` layers are hooked too).

    Returns:
        ``(sums, counts)``: module name → float64 ``Σ_tokens x²`` ``(in,)``, and → token count.
    """
    from lowbit.nn.linear import QuantLinear

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name: str):
        def f(mod: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> None:
            x = args[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float64)
            s = (x * x).sum(dim=0)
            if name in sums:
                sums[name] += s
            else:
                sums[name] = s
            counts[name] = counts.get(name, 0) + x.shape[0]
        return f

    for name, mod in model.named_modules():
        if isinstance(mod, include + (QuantLinear,)):
            hooks.append(mod.register_forward_pre_hook(hook(name)))
    try:
        with torch.no_grad():
            for b in batches:
                model(**b) if isinstance(b, Mapping) else model(b)
    finally:
        for h in hooks:
            h.remove()
    return sums, counts


def collect_imatrix(model: torch.nn.Module, batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
                    dataset: str = "", chunk_size: int = 0) -> Imatrix:
    """Importance matrix of a Llama-family model keyed by GGUF tensor names (``blk.N.*.weight``).

    As llama.cpp's imatrix tool, only the linear layers inside blocks are collected (not ``lm_head``).
    """
    from lowbit.io.gguf_export import hf_to_gguf_name

    batches = list(batches)
    sums, counts = collect_act_sq_mean(model, batches)
    im = Imatrix(chunk_count=len(batches), chunk_size=chunk_size, datasets=(dataset,) if dataset else ())
    for mname, s in sums.items():
        g = hf_to_gguf_name(mname)
        if g is None or not g.startswith("blk."):
            continue
        im.sums[f"{g}.weight"] = s.to(torch.float32).numpy()
        im.counts[f"{g}.weight"] = float(counts[mname])
    return im


# ---------------------------------------------------------------------------------------------- files
def write_imatrix_gguf(path: str | os.PathLike[str], imatrix: Imatrix, overwrite: bool = True) -> None:
    """Write the GGUF imatrix format that current llama-quantize reads."""
    w = GGUFWriter()
    w.add_str("general.type", "imatrix")
    w.add_array("imatrix.datasets", list(imatrix.datasets), GGUFValueType.STRING)
    w.add_u32("imatrix.chunk_count", imatrix.chunk_count)
    w.add_u32("imatrix.chunk_size", imatrix.chunk_size)
    for name in sorted(imatrix.sums):
        s = np.ascontiguousarray(imatrix.sums[name], dtype="<f4").reshape(1, -1)
        w.add_tensor(f"{name}.in_sum2", s.shape, "F32", s.view(np.uint8).reshape(-1))
        c = np.array([[imatrix.counts.get(name, 0.0)]], dtype="<f4")
        w.add_tensor(f"{name}.counts", c.shape, "F32", c.view(np.uint8).reshape(-1))
    w.write(path, overwrite=overwrite)


def write_imatrix_dat(path: str | os.PathLike[str], imatrix: Imatrix, overwrite: bool = True) -> None:
    """Write the legacy ``.dat`` format (values = mean · ncall, ncall = chunk count)."""
    ncall = max(int(imatrix.chunk_count), 1)
    parts = [struct.pack("<i", len(imatrix.sums))]
    for name in sorted(imatrix.sums):
        b = name.encode()
        vals = (imatrix.importance(name) * np.float32(ncall)).astype("<f4")
        parts += [struct.pack("<i", len(b)), b, struct.pack("<ii", ncall, vals.shape[0]), vals.tobytes()]
    ds = (imatrix.datasets[0] if imatrix.datasets else "").encode()
    parts += [struct.pack("<i", imatrix.chunk_count), struct.pack("<i", len(ds)), ds]
    with atomic_file(path, overwrite=overwrite) as f:
        f.write(b"".join(parts))  # type: ignore[attr-defined]


def read_imatrix(path: str | os.PathLike[str]) -> Imatrix:
    """Read a GGUF or legacy ``.dat`` imatrix (detected by the ``GGUF`` magic).

    Raises:
        ValueError: malformed or truncated file, naming what is wrong.
    """
    with open(path, "rb") as f:
        magic = f.read(4)
    return _read_gguf(path) if magic == b"GGUF" else _read_dat(path)


def _read_gguf(path: str | os.PathLike[str]) -> Imatrix:
    from lowbit.io.gguf_reader import read_gguf

    g = read_gguf(path)
    try:
        md = g.metadata
        missing = [k for k in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size") if k not in md]
        if missing:
            raise ValueError(f"{path}: missing imatrix metadata {missing}")
        im = Imatrix(chunk_count=int(md["imatrix.chunk_count"]), chunk_size=int(md["imatrix.chunk_size"]),
                     datasets=tuple(md["imatrix.datasets"]))
        for name in g.tensors:
            if name.endswith(".in_sum2"):
                base = name[: -len(".in_sum2")]
                if base + ".counts" not in g.tensors:
                    raise ValueError(f"{path}: {name} has no matching {base}.counts")
                s = g.tensor(name).numpy().astype(np.float32)
                c = g.tensor(base + ".counts").numpy().astype(np.float32).reshape(-1)
                if s.ndim == 2 and s.shape[0] > 1:
                    # MoE: one row per expert; llama-quantize concatenates per-expert means
                    cc = np.where(c > 0, c, 1)[:, None]
                    im.sums[base] = (s / cc).reshape(-1)
                    im.counts[base] = 1.0
                else:
                    im.sums[base] = s.reshape(-1)
                    im.counts[base] = float(c[0]) if c.size else 0.0
        return im
    finally:
        g.close()


def _read_dat(path: str | os.PathLike[str]) -> Imatrix:
    data = open(path, "rb").read()
    pos = 0

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > len(data):
            raise ValueError(f"{path}: truncated imatrix .dat while reading {what} (offset {pos}, size {len(data)})")
        b = data[pos:pos + n]
        pos += n
        return b

    (n,) = struct.unpack("<i", take(4, "entry count"))
    if n < 0 or n > len(data) // 12:
        raise ValueError(f"{path}: implausible entry count {n} for a {len(data)}-byte file")
    im = Imatrix()
    ncall_max = 0
    for i in range(n):
        (ln,) = struct.unpack("<i", take(4, f"entry {i} name length"))
        if not 0 < ln <= 4096:
            raise ValueError(f"{path}: entry {i} has name length {ln}")
        name = take(ln, f"entry {i} name").decode("utf-8", errors="replace")
        ncall, nval = struct.unpack("<ii", take(8, f"entry {name} counts"))
        if nval < 0:
            raise ValueError(f"{path}: entry {name} has {nval} values")
        vals = np.frombuffer(take(4 * nval, f"entry {name} values"), dtype="<f4").astype(np.float32)
        im.sums[name] = vals.copy()
        im.counts[name] = float(max(ncall, 1))
        ncall_max = max(ncall_max, ncall)
    im.chunk_count = ncall_max
    if pos + 4 <= len(data):
        (im.chunk_count,) = struct.unpack("<i", take(4, "last call"))
        if pos + 4 <= len(data):
            (ln,) = struct.unpack("<i", take(4, "dataset name length"))
            if 0 < ln <= len(data) - pos:
                im.datasets = (take(ln, "dataset name").decode("utf-8", errors="replace"),)
    return im
