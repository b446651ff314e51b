"""The stale-code check fails when the committed generated code does not match the protos."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

from enrollment.server.transport.auth import required_role

ROOT = Path(__file__).resolve().parent.parent


def copy_tree(tmp_path: Path) -> None:
    for folder in ("scripts", "protos", "docs"):
        shutil.copytree(ROOT / folder, tmp_path / folder)


def check(tree: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(tree / "scripts" / "gen_protos.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_stale_check_passes_on_the_repo_and_fails_on_a_changed_proto(tmp_path):
    copy_tree(tmp_path)
    assert check(tmp_path).returncode == 0

    proto = tmp_path / "protos/enrollment/v1/enrollment.proto"
    proto.write_text(proto.read_text().replace("// Returns one student.", "// Returns a student."))
    stale = check(tmp_path)
    assert stale.returncode == 1
    # Only the comment changed: the descriptor set with source info notices it.
    assert "enrollment/v1/enrollment.binpb" in stale.stdout


def test_stale_check_notices_a_missing_generated_file(tmp_path):
    copy_tree(tmp_path)
    (tmp_path / "protos/enrollment/v1/enrollment_pb2_grpc.pyi").unlink()
    stale = check(tmp_path)
    assert stale.returncode == 1 and "enrollment_pb2_grpc.pyi" in stale.stdout


def test_stale_check_notices_an_api_reference_behind_the_comments(tmp_path):
    copy_tree(tmp_path)
    docs = tmp_path / "docs/api.md"
    docs.write_text(docs.read_text().replace("Returns one student.", "Returns a student."))
    stale = check(tmp_path)
    assert stale.returncode == 1 and "docs/api.md" in stale.stdout


def test_stale_check_notices_a_changed_googleapis_copy(tmp_path):
    copy_tree(tmp_path)
    status = tmp_path / "protos/google/rpc/status.proto"
    status.write_text(status.read_text() + "\n// edited by hand\n")
    stale = check(tmp_path)
    assert stale.returncode == 1 and "google/rpc/status.proto" in stale.stdout


def test_every_rpc_comment_states_the_role_the_server_enforces():
    # docs/api.md and `grpcurl describe` take each method's role from its comment.
    data = (ROOT / "protos/enrollment/v1/enrollment.binpb").read_bytes()
    files = {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(data).file}
    proto = files["enrollment/v1/enrollment.proto"]
    comments = {tuple(loc.path): loc.leading_comments for loc in proto.source_code_info.location}
    (service,) = proto.service
    stated = {}
    for index, method in enumerate(service.method):
        roles = re.findall(r"^ Role: (\w+)\.$", comments[(6, 0, 2, index)], re.MULTILINE)
        stated[method.name] = roles
    assert stated == {m.name: [required_role(m.name)] for m in service.method}
