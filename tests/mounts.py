"""File systems the tests mount themselves (a small tmpfs, a read-only bind mount):
skipped, with the reason, where mounting is not allowed, except under CI=true, where the
suite runs as root and must cover them."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def mounted(where: Path, *mount_args: str) -> Iterator[Path]:
    """`mount *mount_args where` (where is made first), unmounted afterwards."""
    where.mkdir()
    mount = subprocess.run(
        ["mount", *mount_args, str(where)], capture_output=True, text=True, check=False
    )
    if mount.returncode != 0:
        reason = f"cannot mount {' '.join(mount_args)} (needs root): {mount.stderr.strip()}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason} (CI=true requires this test)")
        pytest.skip(reason)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at where."""
    with mounted(where, "-t", "tmpfs", "-o", f"size={size}", "tmpfs") as disk:
        yield disk


@contextlib.contextmanager
def read_only_view(source: Path, where: Path) -> Iterator[Path]:
    """source's files seen at where on a read-only file system (a bind mount remounted
    read-only): a volume mounted read-only by mistake."""
    with mounted(where, "--bind", str(source)):
        subprocess.run(["mount", "-o", "remount,ro,bind", str(where)], check=True)
        yield where
