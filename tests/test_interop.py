"""Clients in other languages against a real server: Node (@grpc/grpc-js with
@grpc/proto-loader) and Go (protoc-gen-go + protoc-gen-go-grpc, Debian's packages in
GOPATH mode). Each creates, enrolls, lists, decodes ErrorInfo and BadRequest, sends
and gets back an id above 2^53 exactly, and watches the course's events (WatchEvents:
a replayed one, one made while the stream is open, then a clean cancel).

`make interop` installs the toolchains and runs these. Without them the tests skip with
the reason, except under CI=true or INTEROP_REQUIRED=1, where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from enrollment.v1 import enrollment_pb2 as pb
from tests import databases
from tests.rpc import TIMEOUT, new_student

ROOT = Path(__file__).resolve().parent.parent
INTEROP = ROOT / "tests" / "interop"
PROTOS = ROOT / "protos"
GOCODE = Path("/usr/share/gocode")  # where Debian's golang-*-dev packages put Go source
GO_PACKAGES = ("google.golang.org/grpc", "google.golang.org/genproto", "google.golang.org/protobuf")
# Above 2^53 (9007199254740992): a JavaScript number cannot hold it, a double rounds it.
BIG_ID = 9007199254740993
# "ok ..." lines each client prints; Node also shows what goes wrong without keepCase.
CHECKS = {"node": 11, "go": 10}


def required() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("INTEROP_REQUIRED") == "1"


def unavailable(why: str) -> None:
    message = f"{why}; `make interop` installs it"
    if required():
        pytest.fail(f"{message} (CI=true / INTEROP_REQUIRED=1 require the interop clients)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def node_client() -> list[str]:
    node = shutil.which("node")
    if node is None:
        unavailable("node is not installed (Debian: nodejs npm)")
    if not (INTEROP / "node" / "node_modules" / "@grpc" / "grpc-js").is_dir():
        unavailable("tests/interop/node has no node_modules (npm ci)")
    return [node, str(INTEROP / "node" / "client.js")]


@pytest.fixture(scope="session")
def go_client(tmp_path_factory) -> list[str]:
    tools = {name: shutil.which(name) for name in ("go", "protoc-gen-go", "protoc-gen-go-grpc")}
    missing = [name for name, path in tools.items() if path is None]
    missing += [p for p in GO_PACKAGES if not (GOCODE / "src" / p).is_dir()]
    if missing:
        unavailable(f"the Go toolchain is incomplete, missing {', '.join(missing)}")
    gopath = tmp_path_factory.mktemp("gopath")
    (gopath / "src").mkdir()
    # Generated code for enrollment.proto as the package "enrollment/v1" of this GOPATH;
    # a Go module would map it to its own import path the same way (M option).
    mapping = "Menrollment/v1/enrollment.proto=enrollment/v1;enrollmentv1"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"--proto_path={PROTOS}",
            f"--plugin=protoc-gen-go={tools['protoc-gen-go']}",
            f"--plugin=protoc-gen-go-grpc={tools['protoc-gen-go-grpc']}",
            f"--go_out={gopath / 'src'}",
            f"--go_opt={mapping}",
            f"--go-grpc_out={gopath / 'src'}",
            f"--go-grpc_opt={mapping}",
            "enrollment/v1/enrollment.proto",
        ],
        check=True,
        capture_output=True,
    )
    source = gopath / "src" / "interop"
    source.mkdir()
    shutil.copy(INTEROP / "go" / "main.go", source)
    env = {
        **os.environ,
        # GOPATH mode: packages come from Debian's /usr/share/gocode, nothing is
        # fetched (no module proxy).
        "GO111MODULE": "off",
        "GOPATH": f"{gopath}{os.pathsep}{GOCODE}",
        "GOFLAGS": "",
    }
    if not os.environ.get("GOCACHE") and not os.environ.get("HOME"):
        env["GOCACHE"] = str(tmp_path_factory.mktemp("gocache"))
    binary = gopath / "bin" / "interop"
    built = subprocess.run(
        [tools["go"], "build", "-o", str(binary), "."],
        cwd=source,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr
    return [str(binary)]


def run_client(language: str, command: list[str], live) -> dict[str, str]:
    # A student with an id above 2^53: made through the API, then renumbered in the
    # database (ids are server-assigned, so no call can ask for one).
    made = new_student(live.stub, name="Big Id")
    databases.query(live.database_url, "UPDATE students SET id = ? WHERE id = ?", (BIG_ID, made.id))
    done = subprocess.run(
        [*command, live.address, str(BIG_ID)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    lines = done.stdout.splitlines()
    assert sum(line.startswith("ok ") for line in lines) == CHECKS[language], done.stdout
    made = json.loads(lines[-1])
    assert made["big_id"] == str(BIG_ID)
    return made


def check_on_the_server(live, made: dict[str, str]) -> None:
    """What the client did is what the server holds."""
    course_id, student_id = int(made["course_id"]), int(made["student_id"])
    course = live.stub.GetCourse(pb.GetCourseRequest(course_id=course_id), timeout=TIMEOUT).course
    assert course.enrolled_count == 2
    roster = live.stub.ListStudents(pb.ListStudentsRequest(course_id=course_id), timeout=TIMEOUT)
    assert sorted(s.id for s in roster.students) == sorted([student_id, BIG_ID])


def test_node_client(node_client, live):
    check_on_the_server(live, run_client("node", node_client, live))


def test_go_client(go_client, live):
    check_on_the_server(live, run_client("go", go_client, live))
