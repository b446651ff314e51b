"""mypy --strict over the client library and a caller of it, as they install.

The folders install under other names (client/ is enrollment.client, protos/enrollment/v1
is enrollment.v1), which mypy cannot map; a temporary tree of links gives it them.
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
    "caller.py": ROOT / "tests/typecheck/caller.py",
}
CHECKED = ["enrollment/client", "caller.py"]


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        for name, target in LAYOUT.items():
            (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / name).symlink_to(target, target_is_directory=target.is_dir())
        command = [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")]
        command += ["--strict", "--explicit-package-bases", *CHECKED]
        return subprocess.run(command, cwd=tmp, env={**os.environ, "MYPYPATH": tmp}).returncode


if __name__ == "__main__":
    sys.exit(main())
