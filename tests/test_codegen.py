"""The stale-code check fails when the committed generated code does not match the protos."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def check(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(tree / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_stale_check_passes_on_the_repo_and_fails_on_a_changed_proto(tmp_path):
    for folder in ("scripts", "protos", "third_party"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    assert check(tmp_path).returncode == 0

    proto = tmp_path / "protos/enrollment/v1/enrollment.proto"
    proto.write_text(proto.read_text().replace("// Returns one student.", "// Returns a student."))
    stale = check(tmp_path)
    assert stale.returncode == 1
    # Only the comment changed: the descriptor set with source info notices it.
    assert "enrollment/v1/enrollment.binpb" in stale.stdout


def test_stale_check_notices_a_missing_generated_file(tmp_path):
    for folder in ("scripts", "protos", "third_party"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    (tmp_path / "protos/enrollment/v1/enrollment_pb2_grpc.pyi").unlink()
    stale = check(tmp_path)
    assert stale.returncode == 1 and "enrollment_pb2_grpc.pyi" in stale.stdout
