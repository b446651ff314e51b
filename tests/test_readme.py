"""The README's grpcurl walkthrough works as written, against a live server."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BIN = Path(sys.executable).parent


def walkthrough_commands() -> list[str]:
    text = README.read_text()
    section = text.split("## Try it with grpcurl", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.startswith("grpcurl ")]


@pytest.mark.own_database  # the walkthrough's ids start at 1
def test_readme_walkthrough_runs_as_written(live, tmp_path):
    commands = walkthrough_commands()
    assert len(commands) == 9
    outputs = []
    for line in commands:
        argv = shlex.split(line.replace("127.0.0.1:50051", live.address))
        argv[0] = str(BIN / "grpcurl")
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=tmp_path)
        outputs.append(result)
        expect_failure = '"course_id": 99' in line
        assert (result.returncode != 0) == expect_failure, (line, result.stderr)
    missing = outputs[6].stderr
    readme = README.read_text()
    assert "Code: InvalidArgument" in missing and "COURSE_NOT_FOUND" in missing
    for detail in missing.splitlines()[-2:]:
        assert detail in readme, "the README shows the error as grpcurl prints it"
    assert '"enrolledCount": 1' in outputs[5].stdout
    assert '"status": "SERVING"' in outputs[8].stdout
