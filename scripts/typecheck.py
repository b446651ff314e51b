"""mypy over the code as it installs: --strict on the client library and a caller of it,
then the server at the strictness pyproject.toml's [tool.mypy] sections give each package.

The folders install under other names (client/ is enrollment.client, protos/enrollment/v1
is enrollment.v1, server/ is enrollment.server), which mypy cannot map; a temporary tree
of links gives it them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYOUT = {
    "enrollment/client": ROOT / "client",
    "enrollment/v1": ROOT / "protos/enrollment/v1",
    "enrollment/server": ROOT / "server",
    "enrollment/migrations": ROOT / "migrations",
    "caller.py": ROOT / "tests/typecheck/caller.py",
}
# What each run checks, and its extra flags on top of pyproject.toml.
RUNS = [
    (["enrollment/client", "caller.py"], ["--strict"]),
    (["enrollment/server"], []),
]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for name, target in LAYOUT.items():
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).symlink_to(target, target_is_directory=target.is_dir())
        failed = 0
        for checked, flags in RUNS:
            command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]
            command += [*flags, "--explicit-package-bases", *checked]
            env = {**os.environ, "MYPYPATH": tmp}
            failed |= subprocess.run(command, cwd=tmp, env=env).returncode
        return failed


if __name__ == "__main__":
    sys.exit(main())
