"""Bearer tokens and roles: who may call what, and what a refused caller is told."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enrollment.server.persistence import engine
from enrollment.server.startup.config import ServerConfig, StartupError
from enrollment.server.startup.server import create_server
from enrollment.server.transport.auth import FailureBuckets, peer_host
from enrollment.v1 import enrollment_pb2 as pb
from enrollment.v1 import enrollment_pb2_grpc as pb_grpc
from tests.rpc import TIMEOUT, expect_error, failure, varint
from tests.servers import SERVER, scrape

# Tokens and roles are checked before any database work.
pytestmark = pytest.mark.databases("sqlite")

BIN = Path(sys.executable).parent
SERVICE = "enrollment.v1.EnrollmentService"
TOKENS = {"reader": "r3ader-secret", "writer": "wr1ter-secret", "admin": "adm1n-secret"}

# Every method with a request that is fine for any role to send.
REQUESTS = {
    "GetStudent": pb.GetStudentRequest(student_id=1),
    "ListStudents": pb.ListStudentsRequest(),
    "GetCourse": pb.GetCourseRequest(course_id=1),
    "ListCourses": pb.ListCoursesRequest(),
    "EnrollStudent": pb.EnrollStudentRequest(student_id=1, course_id=1),
    "DropCourse": pb.DropCourseRequest(student_id=1, course_id=1),
    "CreateStudent": pb.CreateStudentRequest(name="Ada", email="ada@example.com"),
    "CreateCourse": pb.CreateCourseRequest(code="CS-1", title="Computing"),
    "DeleteStudent": pb.DeleteStudentRequest(student_id=99),
    "DeleteCourse": pb.DeleteCourseRequest(course_id=99),
}
ALLOWED = {
    "reader": {"GetStudent", "ListStudents", "GetCourse", "ListCourses"},
    "writer": {"GetStudent", "ListStudents", "GetCourse", "ListCourses", "EnrollStudent"}
    | {"DropCourse"},
    "admin": set(REQUESTS),
}


def sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.txt"
    lines = ["# hash role name", ""]
    lines += [f"{sha256(token)} {role} {role}-bot" for role, token in TOKENS.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def secured(start_server, tokens_file):
    return start_server(auth_tokens=str(tokens_file))


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def call(live, method: str, metadata=None):
    return getattr(live.stub, method)(REQUESTS[method], timeout=TIMEOUT, metadata=metadata)


@pytest.mark.parametrize("method", sorted(REQUESTS))
def test_missing_or_unknown_token_is_unauthenticated(secured, method):
    stub_call = getattr(secured.stub, method)
    request = REQUESTS[method]
    for metadata, reason in [
        (None, "MISSING_TOKEN"),
        ((("authorization", "Basic YWRhOmFkYQ=="),), "MISSING_TOKEN"),
        ((("authorization", "Bearer "),), "MISSING_TOKEN"),
        (bearer("not-a-token"), "INVALID_TOKEN"),
        (bearer(TOKENS["admin"] + "x"), "INVALID_TOKEN"),
    ]:
        with pytest.raises(grpc.RpcError) as raised:
            stub_call(request, timeout=TIMEOUT, metadata=metadata)
        got = failure(raised.value)
        assert (got.code, got.reason, got.domain) == (
            grpc.StatusCode.UNAUTHENTICATED,
            reason,
            "enrollment.v1",
        )
        assert "secret" not in got.message


def test_roles_allow_exactly_their_methods(secured):
    call(secured, "CreateStudent", bearer(TOKENS["admin"]))
    call(secured, "CreateCourse", bearer(TOKENS["admin"]))
    for role, token in TOKENS.items():
        for method in REQUESTS:
            if method in ALLOWED[role]:
                try:
                    call(secured, method, bearer(token))
                except grpc.RpcError as error:  # a domain answer, past the door
                    assert failure(error).code not in (
                        grpc.StatusCode.UNAUTHENTICATED,
                        grpc.StatusCode.PERMISSION_DENIED,
                    ), (role, method)
            else:
                got = expect_error(
                    lambda request, timeout, m=method, t=token: call(secured, m, bearer(t)),
                    None,
                    grpc.StatusCode.PERMISSION_DENIED,
                    "ROLE_TOO_LOW",
                )
                assert got.metadata["role"] == role, (role, method)
                assert got.metadata["required_role"] in ("writer", "admin")
    # The scheme is case-insensitive, as in HTTP.
    metadata = (("authorization", f"bearer {TOKENS['reader']}"),)
    assert call(secured, "GetStudent", metadata).student.id == 1


def test_health_and_reflection_stay_open(secured, tmp_path):
    health = health_pb2_grpc.HealthStub(secured.channel)
    reply = health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=TIMEOUT)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    listed = subprocess.run(
        [str(BIN / "grpcurl"), "-plaintext", "-max-time", "10", secured.address, "list"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert listed.returncode == 0 and SERVICE in listed.stdout, listed.stderr


def test_grpcurl_with_a_bearer_header(secured, tmp_path):
    def grpcurl(*headers: str):
        argv = [str(BIN / "grpcurl"), "-plaintext", "-max-time", "10", *headers]
        argv += ["-d", '{"code": "CS-101", "title": "Intro"}', secured.address]
        argv.append(f"{SERVICE}/CreateCourse")
        return subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=tmp_path)

    made = grpcurl("-H", f"authorization: Bearer {TOKENS['admin']}")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["course"]["code"] == "CS-101"
    denied = grpcurl("-H", f"authorization: Bearer {TOKENS['writer']}")
    assert "PermissionDenied" in denied.stderr and "ROLE_TOO_LOW" in denied.stderr
    missing = grpcurl()
    assert "Unauthenticated" in missing.stderr and "MISSING_TOKEN" in missing.stderr


def test_tokens_are_never_logged_but_their_names_are(secured, caplog):
    caplog.set_level(logging.DEBUG)
    call(secured, "CreateStudent", bearer(TOKENS["admin"]))
    with pytest.raises(grpc.RpcError):
        call(secured, "DeleteStudent", bearer(TOKENS["reader"]))
    with pytest.raises(grpc.RpcError):
        call(secured, "GetStudent", bearer("wrong-secret"))
    lines = [r.getMessage() for r in caplog.records if r.name == "enrollment.rpc"]
    assert len(lines) == 3
    assert "code=OK" in lines[0] and "token=admin-bot" in lines[0]
    assert "reason=ROLE_TOO_LOW" in lines[1] and "token=reader-bot" in lines[1]
    assert "reason=INVALID_TOKEN" in lines[2] and "token=-" in lines[2]
    for secret in [*TOKENS.values(), "wrong-secret"]:
        assert secret not in caplog.text


@pytest.mark.parametrize(
    "body",
    # Not protobuf; a name of 80,000 bytes, over the 64 KiB limit (within grpc's own).
    [b"\xff\xff\xff", b"\x0a" + varint(80_000) + b"x" * 80_000],
)
def test_an_undecodable_or_oversized_body_without_a_token_is_unauthenticated(secured, body):
    raw = secured.channel.unary_unary(f"/{SERVICE}/CreateStudent")
    expect_error(raw, body, grpc.StatusCode.UNAUTHENTICATED, "MISSING_TOKEN")


def test_hash_token_prints_a_usable_line_and_the_token(start_server, tmp_path):
    made = subprocess.run(
        [SERVER, "hash-token", "--role", "writer", "--name", "billing"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert made.returncode == 0, made.stderr
    token = made.stderr.strip()
    digest, role, name = made.stdout.split()
    assert (digest, role, name) == (sha256(token), "writer", "billing")
    assert len(token) >= 40  # 32 random bytes, URL-safe base64
    (tmp_path / "t.txt").write_text(made.stdout)
    live = start_server(auth_tokens=str(tmp_path / "t.txt"))
    call(live, "ListCourses", bearer(token))


def test_client_cli_sends_the_token_from_flag_or_environment(secured):
    argv = [str(BIN / "enrollment-client"), "--address", secured.address, "--json", "courses"]
    env = {k: v for k, v in os.environ.items() if k != "ENROLLMENT_TOKEN"}

    def run(*extra: str, token_env: str | None = None):
        environment = {**env, "ENROLLMENT_TOKEN": token_env} if token_env else env
        return subprocess.run(
            [*argv, *extra], capture_output=True, text=True, timeout=30, env=environment
        )

    assert run("--token", TOKENS["reader"]).returncode == 0
    assert run(token_env=TOKENS["reader"]).returncode == 0
    missing = run()
    assert missing.returncode == 1
    assert json.loads(missing.stdout)["error"]["reason"] == "MISSING_TOKEN"


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", "holds no tokens"),
        ("# only a comment\n", "holds no tokens"),
        (f"{sha256('a')} reader\n", "line 1: expected"),
        (f"\n{sha256('a')[:-1]} reader bot\n", "line 2: the first field must be 64 hex"),
        (f"{sha256('a')} root bot\n", "line 1: the role must be one of reader, writer, admin"),
        (f"{sha256('a')} reader b\u00f6t\n", "line 1: the name"),
        (f"{sha256('a')} reader one\n{sha256('a')} admin two\n", "line 2: the same"),
        (f"{sha256('a')} reader bot\n{sha256('b')} admin bot\n", "line 2: the same"),
    ],
)
def test_malformed_tokens_file_refuses_to_start(db_url, tmp_path, content, expected):
    path = tmp_path / "tokens.txt"
    path.write_text(content)
    with pytest.raises(StartupError, match=expected) as raised:
        create_server(
            ServerConfig(address="127.0.0.1:0", database_url=db_url, auth_tokens=str(path))
        )
    assert sha256("a") not in str(raised.value)


def test_serve_with_a_missing_tokens_file_exits_with_a_clear_error(db_url, tmp_path):
    missing = tmp_path / "nope.txt"
    result = subprocess.run(
        [SERVER, "serve", "--address", "127.0.0.1:0", "--database-url", db_url]
        + ["--auth-tokens", str(missing)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "cannot read the tokens file" in result.stderr and "Traceback" not in result.stderr


def test_arbitrary_authorization_values_are_only_ever_unauthenticated(start_server, tokens_file):
    # 60 wrong tokens from one address: the failure limit (tested below) is set above it.
    secured = start_server(auth_tokens=str(tokens_file), auth_failure_burst=1000)
    printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=300)

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(value=st.one_of(printable, printable.map(lambda t: "Bearer " + t)))
    def property_(value):
        with pytest.raises(grpc.RpcError) as raised:
            secured.stub.ListCourses(
                pb.ListCoursesRequest(), timeout=TIMEOUT, metadata=(("authorization", value),)
            )
        got = failure(raised.value)
        assert got.code == grpc.StatusCode.UNAUTHENTICATED, got
        assert got.reason in ("MISSING_TOKEN", "INVALID_TOKEN")

    property_()
    assert call(secured, "ListCourses", bearer(TOKENS["reader"])).courses == []


# --------------------------------------------------------------- hostile callers


@pytest.mark.parametrize("order", ["wrong first", "wrong last"])
def test_two_authorization_values_are_refused(secured, order):
    """A proxy in front may have checked only one of them: the call is refused whole."""
    values = [("authorization", "Bearer wrong-secret"), *bearer(TOKENS["admin"])]
    if order == "wrong last":
        values.reverse()
    for method in ("GetStudent", "CreateStudent"):
        with pytest.raises(grpc.RpcError) as raised:
            call(secured, method, tuple(values))
        got = failure(raised.value)
        assert (got.code, got.reason) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_TOKEN")
        assert "more than one" in got.message
    # The same token alone is fine.
    assert call(secured, "ListCourses", bearer(TOKENS["admin"])).courses == []


def test_wrong_tokens_are_counted_by_peer_and_limited_for_that_peer_only(db_url, tokens_file):
    """20 wrong tokens from one address, then its calls are refused at once (even with a
    good token) until its bucket refills; another address is served as before."""
    config = ServerConfig(
        address="[::]:0",
        database_url=db_url,
        auth_tokens=str(tokens_file),
        metrics_address="127.0.0.1:0",
        auth_failure_burst=20,
        auth_failure_rate=0.5,
    )
    running = create_server(config)
    attacker = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    other = grpc.insecure_channel(f"[::1]:{running.port}")
    try:
        stub = pb_grpc.EnrollmentServiceStub(attacker)
        request = pb.ListCoursesRequest()

        def attempt(token):
            with pytest.raises(grpc.RpcError) as raised:
                stub.ListCourses(request, timeout=TIMEOUT, metadata=bearer(token))
            return failure(raised.value)

        reasons = [attempt(f"guess-{n}").reason for n in range(25)]
        assert reasons == ["INVALID_TOKEN"] * 20 + ["AUTH_FAILURES_LIMITED"] * 5
        limited = attempt(TOKENS["reader"])  # the right token is not even looked at now
        assert limited.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert float(limited.metadata["retry_after_seconds"]) > 0

        # Another address is not held back by the attacker's failures.
        good = pb_grpc.EnrollmentServiceStub(other)
        assert good.ListCourses(request, timeout=TIMEOUT, metadata=bearer(TOKENS["reader"]))

        metrics = scrape(running.metrics_port)
        key = "enrollment_auth_failures_total"
        counted = {labels: n for (name, labels), n in metrics.items() if name == key}
        by_peer = {
            (dict(labels)["peer"], dict(labels)["reason"]): n for labels, n in counted.items()
        }
        assert len({peer for peer, _ in by_peer}) == 1, by_peer  # only the attacker
        ((peer, _),) = [k for k in by_peer if k[1] == "INVALID_TOKEN"]
        assert peer in ("ipv4:127.0.0.1", "ipv6:[::ffff:127.0.0.1]"), peer  # no port
        assert by_peer == {(peer, "INVALID_TOKEN"): 20, (peer, "AUTH_FAILURES_LIMITED"): 6}
    finally:
        attacker.close()
        other.close()
        running.stop(None).wait(10)
        running.wait_idle()
        engine.close_pool()


def test_failure_buckets_refill_and_stay_bounded():
    now = [0.0]
    buckets = FailureBuckets(burst=3, per_second=1.0, max_peers=2, clock=lambda: now[0])
    for _ in range(3):
        assert buckets.retry_after("a") == 0
        buckets.failed("a")
    assert buckets.retry_after("a") == pytest.approx(1.0)
    assert buckets.retry_after("b") == 0
    now[0] = 1.0
    assert buckets.retry_after("a") == 0  # one more try a second
    buckets.failed("a")
    assert buckets.retry_after("a") > 0
    buckets.failed("b")
    buckets.failed("c")  # a third peer: the table holds two, the oldest goes
    assert len(buckets._buckets) == 2


def test_peer_host_drops_the_port():
    assert peer_host("ipv4:10.0.0.7:51234") == "ipv4:10.0.0.7"
    assert peer_host("ipv6:[::1]:51234") == "ipv6:[::1]"
    assert peer_host("unix:/run/enrollment.sock") == "unix:/run/enrollment.sock"
