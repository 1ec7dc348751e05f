"""Atomic writes: a crash never leaves a half-written file or directory under the final name.

Files are written to a temporary sibling and moved into place with ``os.replace``; directories are built
in a temporary sibling directory and swapped in. An existing output is never replaced unless the caller
passes ``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_file", "atomic_dir", "check_writable"]


def check_writable(path: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse to clobber an existing output unless ``overwrite``; return the path."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise FileExistsError(f"{p} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if not p.parent.exists():
        raise FileNotFoundError(f"parent directory {p.parent} does not exist")
    return p


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _plain_mode(path: str | os.PathLike[str], is_dir: bool) -> None:
    """Give a temporary file/dir the permissions a plain ``open``/``mkdir`` would (mkstemp makes them 0600/0700)."""
    os.chmod(path, (0o777 if is_dir else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], overwrite: bool = False, mode: str = "wb") -> Iterator[object]:
    """Open a temporary file beside ``path``; on success fsync and move it to ``path``."""
    p = check_writable(path, overwrite)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    try:
        _plain_mode(tmp, is_dir=False)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it becomes ``path``.

    With ``overwrite`` an existing ``path`` is moved aside first and removed only after the new one is in
    place, so at every instant either the old or the new complete output exists.
    """
    p = check_writable(path, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent))
    try:
        _plain_mode(tmp, is_dir=True)
        yield tmp
        old = None
        if p.exists():
            old = p.with_name(f".{p.name}.old-{os.getpid()}")
            os.replace(p, old)
        os.replace(tmp, p)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
