"""The stale-code check fails when the committed generated code does not match the protos."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
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


SAMPLE = """syntax = "proto3";

package sample.v1;

// Says hello.
service GreeterService {
  // Streams greetings.
  //
  // Role: reader.
  //
  // Errors: NOT_FOUND (NO_ONE).
  rpc WatchGreetings(WatchGreetingsRequest) returns (stream WatchGreetingsResponse);
}

// How a greeting feels.
enum Mood {
  // Not said.
  MOOD_UNSPECIFIED = 0;
  // Glad.
  MOOD_GLAD = 1;
}

// Request for WatchGreetings.
message WatchGreetingsRequest {
  // Labels to match.
  map<string, int64> labels = 1;
}

// Response for WatchGreetings.
message WatchGreetingsResponse {
  // One greeting.
  message Greeting {
    // Its mood.
    Mood mood = 1;
  }
  // The greetings.
  repeated Greeting greetings = 1;
}
"""


def render_sample(tmp_path: Path, text: str) -> str:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_protos
    finally:
        sys.path.pop(0)
    (tmp_path / "sample.proto").write_text(text)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"--proto_path={tmp_path}",
         f"--descriptor_set_out={tmp_path / 'set.binpb'}", "--include_source_info",
         "--include_imports", "sample.proto"],
        check=True,
    )  # fmt: skip
    data = (tmp_path / "set.binpb").read_bytes()
    return gen_protos.render_api_docs(
        descriptor_pb2.FileDescriptorSet.FromString(data), ["sample.proto"]
    )


def test_the_reference_covers_streams_enums_maps_and_nested_messages(tmp_path):
    docs = render_sample(tmp_path, SAMPLE)
    assert (
        "`rpc WatchGreetings(WatchGreetingsRequest) returns (stream WatchGreetingsResponse)`"
        in docs
    )
    assert "- Role: reader\n- Errors: NOT_FOUND (NO_ONE)." in docs
    assert "| `labels` | 1 | map<string, int64> | Labels to match. |" in docs
    assert "| `greetings` | 1 | repeated [Greeting](#greeting) | The greetings. |" in docs
    assert "| `mood` | 1 | [Mood](#mood) | Its mood. |" in docs
    assert "| `MOOD_GLAD` | 1 | Glad. |" in docs
    assert "## Enums" in docs and "### Greeting" in docs


def test_an_rpc_without_its_role_or_errors_stops_the_generator(tmp_path):
    with pytest.raises(SystemExit, match="rpc WatchGreetings has no Role"):
        render_sample(tmp_path, SAMPLE.replace("  // Role: reader.\n  //\n", ""))
