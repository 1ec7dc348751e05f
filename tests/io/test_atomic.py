"""Atomic writes: nothing half-written under the final name, and the permissions a plain write would give."""

from __future__ import annotations

import os
import stat

import pytest

from lowbit.io.atomic import atomic_dir, atomic_file


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_file_and_dir_get_umask_permissions_not_mkstemps_0600(tmp_path, umask_022) -> None:
    with atomic_file(tmp_path / "out.bin") as f:
        f.write(b"abc")
    assert stat.S_IMODE((tmp_path / "out.bin").stat().st_mode) == 0o644
    with atomic_dir(tmp_path / "ckpt") as d:
        (d / "x").write_text("y")
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o755


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path) -> None:
    target = tmp_path / "keep.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target, overwrite=True, mode="w") as f:
            f.write("new, half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
