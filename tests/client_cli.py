"""Running the enrollment-client command against a live server, for the CLI tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CLIENT = Path(sys.executable).parent / "enrollment-client"
# Generous: a slow machine must not turn a passing call into DEADLINE_EXCEEDED.
CALL_TIMEOUT = "10"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ENROLLMENT_ADDRESS"}
    env.update(extra)
    return env


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CLIENT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env if env is not None else _env(),
    )


def cli(live, *args: str) -> subprocess.CompletedProcess[str]:
    return run("--address", live.address, "--timeout", CALL_TIMEOUT, *args)


def ok(live, *args: str) -> str:
    done = cli(live, *args)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    assert done.stderr == ""
    return done.stdout


def ok_json(live, *args: str):
    return json.loads(ok(live, "--json", *args))


def key_values(text: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in text.splitlines())


def table(text: str) -> list[list[str]]:
    """Rows of a readable list, header included, split on runs of spaces."""
    return [line.split() for line in text.splitlines() if not line.startswith("next page: ")]
