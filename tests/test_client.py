"""The sample client (console script and EnrollmentClient) against a live server."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from enrollment.client.api import ClientError, EnrollmentClient
from enrollment.v1 import enrollment_pb2 as pb
from tests.client_cli import _env, cli, key_values, ok, ok_json, run, table
from tests.rpc import enroll, new_course, new_student


def rpc_calls(caplog, method: str) -> int:
    return sum(f"method={method} " in r.getMessage() for r in caplog.records)


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections but never speaks HTTP/2, so calls hang."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield sock.getsockname()[1]


# The console script.


def test_enroll_list_and_drop(live):
    student = key_values(ok(live, "create-student", "--name", "Ada Lovelace", "--email", "a@x.io"))
    assert student["name"] == "Ada Lovelace"
    assert student["email"] == "a@x.io"
    course = key_values(
        ok(live, "create-course", "--code", "CS-101", "--title", "Intro", "--capacity", "2")
    )
    assert (course["code"], course["capacity"], course["enrolled_count"]) == ("CS-101", "2", "0")
    # Alone, an item shows every field: the etag an update's --etag takes among them.
    assert list(student) == ["id", "name", "email", "create_time", "update_time", "etag"]
    assert list(course) == [
        "id", "code", "title", "capacity", "enrolled_count", "waitlist_capacity",
        "waitlisted_count", "create_time", "update_time", "etag",
    ]  # fmt: skip
    assert (course["waitlist_capacity"], course["waitlisted_count"]) == ("none", "0")
    assert course["etag"] == ok_json(live, "course", "--id", course["id"])["etag"]
    assert course["update_time"] == course["create_time"]
    other = new_course(live.stub, code="MA-1")
    sid, cid = student["id"], course["id"]

    enrollment = key_values(ok(live, "enroll", "--student", sid, "--course", cid))
    assert (enrollment["student_id"], enrollment["course_id"]) == (sid, cid)
    assert enrollment["enroll_time"].endswith("Z")
    assert enrollment["create_time"] == enrollment["enroll_time"]

    plain = ok(live, "courses", "--student", sid)
    assert table(plain) == [
        ["ID", "CODE", "TITLE", "CAPACITY", "ENROLLED", "WAITLIST", "WAITING", "CREATED"],
        [cid, "CS-101", "Intro", "2", "1", "none", "0", course["create_time"]],
    ]
    assert "next page" not in plain

    page = ok_json(live, "courses", "--student", sid)
    assert page["nextPageToken"] == ""
    [listed] = page["courses"]
    assert listed["id"] == cid  # int64 stays a string, as in the protobuf JSON mapping
    assert (listed["code"], listed["title"]) == ("CS-101", "Intro")
    assert (listed["capacity"], listed["enrolledCount"]) == (2, 1)
    assert ok_json(live, "students", "--course", cid)["students"][0]["email"] == "a@x.io"
    catalogue = ok_json(live, "courses")["courses"]
    assert [c["id"] for c in catalogue] == [cid, str(other.id)]

    assert ok(live, "drop", "--student", sid, "--course", cid) == (
        f"dropped student {sid} from course {cid}\n"
    )
    assert ok(live, "courses", "--student", sid) == "no courses\n"
    assert ok_json(live, "courses", "--student", sid) == {"courses": [], "nextPageToken": ""}
    assert key_values(ok(live, "course", "--id", cid))["enrolled_count"] == "0"


def test_enrolling_in_a_missing_course_fails_with_the_details(live):
    student = new_student(live.stub)
    done = cli(live, "enroll", "--student", str(student.id), "--course", "424242")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "error: INVALID_ARGUMENT COURSE_NOT_FOUND: course 424242 does not exist",
        "  field: course_id",
    ]

    done = cli(live, "--json", "enroll", "--student", str(student.id), "--course", "424242")
    assert done.returncode == 1
    assert done.stderr == ""
    assert json.loads(done.stdout) == {
        "error": {
            "code": "INVALID_ARGUMENT",
            "reason": "COURSE_NOT_FOUND",
            "message": "course 424242 does not exist",
            "fields": ["course_id"],
        }
    }


def test_every_malformed_field_is_listed(live):
    done = cli(live, "enroll", "--student", "0", "--course", "-3")
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert lines[0].startswith("error: INVALID_ARGUMENT INVALID_FIELD: ")
    assert lines[1:] == ["  field: student_id", "  field: course_id"]


def test_not_found_has_a_reason_and_no_fields(live):
    done = cli(live, "--json", "student", "--id", "77")
    assert done.returncode == 1
    error = json.loads(done.stdout)["error"]
    assert (error["code"], error["reason"], error["fields"]) == (
        "NOT_FOUND",
        "STUDENT_NOT_FOUND",
        [],
    )


def test_delete_refuses_enrolled_student_unless_forced(live):
    student = new_student(live.stub)
    course = new_course(live.stub)
    enroll(live.stub, student.id, course.id)
    done = cli(live, "delete-student", "--id", str(student.id))
    assert done.returncode == 1
    assert done.stderr.startswith("error: FAILED_PRECONDITION HAS_ENROLLMENTS: ")
    assert ok_json(live, "delete-student", "--id", str(student.id), "--force") == {}
    assert ok_json(live, "course", "--id", str(course.id))["enrolledCount"] == 0
    assert ok(live, "delete-course", "--id", str(course.id)) == f"deleted course {course.id}\n"


def test_students_all_walks_every_page(live, caplog):
    caplog.set_level(logging.INFO, logger="enrollment.rpc")
    ids = [str(new_student(live.stub, email=f"s{i}@example.com").id) for i in range(5)]

    first = ok(live, "students", "--page-size", "2")
    assert [row[0] for row in table(first)[1:]] == ids[:2]
    token = first.splitlines()[-1].removeprefix("next page: ")
    assert token and token != first.splitlines()[-1]
    second = ok(live, "students", "--page-size", "2", "--page-token", token)
    assert [row[0] for row in table(second)[1:]] == ids[2:4]

    caplog.clear()
    everything = ok(live, "students", "--all", "--page-size", "2")
    assert [row[0] for row in table(everything)[1:]] == ids
    assert "next page" not in everything
    assert rpc_calls(caplog, "ListStudents") == 3  # pages of 2, 2 and 1

    page = ok_json(live, "students", "--all", "--page-size", "2")
    assert [s["id"] for s in page["students"]] == ids
    assert page["nextPageToken"] == ""


def test_timeout_is_honoured(silent_port):
    started = time.monotonic()
    done = run("--address", f"127.0.0.1:{silent_port}", "--timeout", "1", "--json", "courses")
    elapsed = time.monotonic() - started
    assert done.returncode == 1
    assert json.loads(done.stdout)["error"]["code"] == "DEADLINE_EXCEEDED"
    # At least the deadline, and well short of the 5 s default.
    assert 1.0 <= elapsed < 4.5


def test_nothing_listening_fails_fast(closed_port):
    started = time.monotonic()
    done = run("--address", f"127.0.0.1:{closed_port}", "--timeout", "3", "course", "--id", "1")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith(("error: UNAVAILABLE: ", "error: DEADLINE_EXCEEDED: "))
    assert time.monotonic() - started < 4.5


def test_address_from_environment_and_options_after_the_subcommand(live):
    course = new_course(live.stub, code="ENV-1")
    done = run(
        "course", "--id", str(course.id), "--json", env=_env(ENROLLMENT_ADDRESS=live.address)
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["code"] == "ENV-1"
    # --address after the subcommand overrides the environment.
    done = run(
        "course", "--id", "1", "--address", "127.0.0.1:1", env=_env(ENROLLMENT_ADDRESS=live.address)
    )
    assert done.returncode == 1
    assert "UNAVAILABLE" in done.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["enroll", "--student", "1"],
        ["student", "--id", "nine"],
        ["student", "--id", str(2**63)],
        ["--timeout", "0", "courses"],
        ["courses", "--page-size", str(2**31)],
        ["no-such-command"],
    ],
)
def test_usage_errors_exit_2(args):
    done = run("--address", "127.0.0.1:1", *args)
    assert done.returncode == 2
    assert done.stdout == ""
    assert "usage: enrollment-client" in done.stderr


@pytest.mark.parametrize("address", ["127.0.0.1:99999", "127.0.0.1:", "127.0.0.1:-5"])
def test_a_port_out_of_range_is_a_usage_error_not_another_server(address):
    # grpc dials 99999 modulo 65536 (34463), an empty port as 443 and -5 as 65531.
    done = run("--address", address, "student", "--id", "1")
    assert done.returncode == 2, done.stderr
    assert "must be 0-65535" in done.stderr
    from_env = run("student", "--id", "1", env=_env(ENROLLMENT_ADDRESS=address))
    assert from_env.returncode == 2 and "must be 0-65535" in from_env.stderr


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        # grpc dialled 443 for a host without a port: another service than the one meant.
        ("127.0.0.1", "'127.0.0.1' has no port: give HOST:PORT, e.g. 127.0.0.1:50051"),
        ("[::1]", "'[::1]' has no port: give HOST:PORT, e.g. 127.0.0.1:50051"),
        ("localhost", "'localhost' has no port: give HOST:PORT, e.g. 127.0.0.1:50051"),
        # grpc's core logged lines and the call failed UNKNOWN.
        ("", "the address is empty: give HOST:PORT, e.g. 127.0.0.1:50051"),
        # A URL: grpc failed to resolve "http://127.0.0.1" as a host name.
        (
            "http://127.0.0.1:50051",
            "'http://127.0.0.1:50051' is a URL: give HOST:PORT, e.g. 127.0.0.1:50051",
        ),
    ],
)
def test_an_address_without_a_port_is_a_usage_error(address, expected):
    done = run("--address", address, "student", "--id", "1")
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr.splitlines()[-1].endswith(f"argument --address: {expected}"), done.stderr


def test_an_empty_enrollment_address_is_the_default():
    # An empty variable is unset (the default address), not an empty address.
    # (Whether a server answers on the default address depends on the machine.)
    done = run("student", "--id", "1", "--timeout", "2", env=_env(ENROLLMENT_ADDRESS=""))
    assert done.returncode != 2 and not done.stderr.startswith("error: UNKNOWN"), done.stderr
    assert "address is empty" not in done.stderr and "target uri" not in done.stderr


@pytest.mark.parametrize("target", ["unix:/tmp/enrollment.sock", "dns:///localhost:1"])
def test_other_grpc_target_forms_pass(target):
    done = run("--address", target, "--timeout", "1", "student", "--id", "1")
    assert done.returncode == 1 and done.stderr.startswith("error: UNAVAILABLE"), done.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--json", "enroll", "--student", "1"],
        ["enroll", "--student", "1", "--json"],
        ["--json", "student", "--id", "nine"],
        ["student", "--json", "--id", "nine"],
        ["--json", "--timeout", "0", "courses"],
        ["courses", "--timeout", "0", "--json"],
        ["--json", "no-such-command"],
        ["--json", "courses", "--tls-cert", "client.crt"],  # no --tls-key: refused before a call
        ["courses", "--tls-cert", "client.crt", "--json"],
    ],
)
def test_usage_errors_honour_json(argv):
    done = run("--address", "127.0.0.1:1", *argv)
    assert done.returncode == 2
    assert done.stderr == ""
    error = json.loads(done.stdout)["error"]
    assert error["code"] == "USAGE"
    assert error["message"] and "\n" not in error["message"]
    assert error["usage"].startswith("usage: enrollment-client")
    assert (error["reason"], error["fields"]) == ("", [])


def test_json_follows_the_protobuf_json_mapping(live):
    student = new_student(live.stub)
    course = new_course(live.stub, capacity=0)

    def names(value) -> set[str]:
        """Every object key in a JSON value, nested ones too."""
        if isinstance(value, dict):
            return set(value) | {n for v in value.values() for n in names(v)}
        if isinstance(value, list):
            return {n for v in value for n in names(v)}
        return set()

    made = ok_json(live, "enroll", "--student", str(student.id), "--course", str(course.id))
    shown = ok_json(live, "course", "--id", str(course.id))
    students = ok_json(live, "students")
    everything = names([made, shown, students, ok_json(live, "student", "--id", str(student.id))])
    assert {"studentId", "courseId", "enrollTime", "enrolledCount", "createTime"} <= everything
    assert "nextPageToken" in students
    assert not [name for name in everything if "_" in name], everything


def test_capacity_0_prints_the_same_in_a_table_and_alone(live):
    course = new_course(live.stub, code="OPEN-1", capacity=0)
    alone = key_values(ok(live, "course", "--id", str(course.id)))["capacity"]
    [_, row] = table(ok(live, "courses"))
    assert row[3] == alone == "unlimited"


def test_subcommand_help_has_its_own_options_only():
    global_help = run("--help").stdout
    for flag in ("--address", "--timeout", "--json", "--token", "--tls-ca", "--tls-cert"):
        assert flag in global_help
    for command, flags in {
        "create-student": ["--name", "--email"],
        "student": ["--id"],
        "students": ["--course"],
        "delete-student": ["--id"],
        "create-course": ["--code", "--title", "--capacity"],
        "course": ["--id"],
        "courses": ["--student"],
        "delete-course": ["--id"],
        "enroll": ["--student", "--course"],
        "drop": ["--student", "--course"],
    }.items():
        text = run(command, "--help").stdout
        for flag in ("--address", "--timeout", "--json", "--token", "--tls-ca", "--tls-cert"):
            assert flag not in text.split("options:", 1)[1], (command, flag)
        assert "enrollment-client --help" in text, command  # says where the global ones are
        for flag in flags:
            # Each option has a line of help after it (on its line or the next).
            entry = re.search(rf"^  {flag}\b(.*)\n(.*)", text, re.M)
            assert entry, (command, flag)
            same_line = entry.group(1).split(maxsplit=1)[1:]
            next_line = entry.group(2)
            continued = next_line.startswith("      ") and not next_line.lstrip().startswith("-")
            assert same_line or continued, (command, flag, text)


def test_python_dash_m_client():
    done = subprocess.run(
        [sys.executable, "-m", "enrollment.client", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    for command in ("create-student", "students", "delete-course", "enroll", "drop"):
        assert command in done.stdout


# The library.


def test_client_error_attributes(live):
    with EnrollmentClient(live.address, timeout=10) as client:
        student = client.create_student("Grace Hopper", "grace@example.com")
        assert student.id > 0
        with pytest.raises(ClientError) as raised:
            client.enroll(student.id, 424242)
        error = raised.value
        assert (error.code, error.reason, error.fields) == (
            "INVALID_ARGUMENT",
            "COURSE_NOT_FOUND",
            ["course_id"],
        )
        assert error.message == "course 424242 does not exist"
        assert str(error) == "INVALID_ARGUMENT COURSE_NOT_FOUND: course 424242 does not exist"

        with pytest.raises(ClientError) as raised:
            client.create_student("Grace Again", "GRACE@example.com")
        assert (raised.value.code, raised.value.reason, raised.value.fields) == (
            "ALREADY_EXISTS",
            "EMAIL_TAKEN",
            [],
        )

        with pytest.raises(ClientError) as raised:
            client.create_course("bad code!", " ", capacity=-1)
        assert raised.value.reason == "INVALID_FIELD"
        assert sorted(raised.value.fields) == ["capacity", "code", "title"]


def test_iter_courses_walks_pages(live, caplog):
    caplog.set_level(logging.INFO, logger="enrollment.rpc")
    with EnrollmentClient(live.address, timeout=10) as client:
        courses = [client.create_course(f"K-{i}", f"Course {i}", capacity=i) for i in range(5)]
        student = client.get_student(new_student(live.stub).id)
        for course in courses[1::2]:
            assert client.enroll(student.id, course.id).course_id == course.id

        page = client.list_courses(page_size=2)
        assert [c.id for c in page.courses] == [c.id for c in courses[:2]]
        assert page.next_page_token

        caplog.clear()
        assert [c.id for c in client.iter_courses(page_size=2)] == [c.id for c in courses]
        assert rpc_calls(caplog, "ListCourses") == 3
        mine = list(client.iter_courses(student.id, page_size=1))
        assert [(c.id, c.enrolled_count) for c in mine] == [(c.id, 1) for c in courses[1::2]]
        assert [s.id for s in client.iter_students(courses[1].id)] == [student.id]
        assert list(client.iter_students(courses[0].id)) == []


def test_iter_stops_on_a_token_that_repeats():
    class LoopingStub:
        def ListCourses(self, request, timeout):
            return pb.ListCoursesResponse(courses=[pb.Course(id=1)], next_page_token="again")

    with EnrollmentClient("127.0.0.1:1") as client:
        client._stub = LoopingStub()
        with pytest.raises(ClientError) as raised:
            list(client.iter_courses())
    assert raised.value.code == "INTERNAL"


def test_library_connection_failure_and_close(closed_port):
    client = EnrollmentClient(f"127.0.0.1:{closed_port}", timeout=3)
    with client, pytest.raises(ClientError) as raised:
        client.get_course(1)
    assert raised.value.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED")
    assert raised.value.reason == ""
    with pytest.raises(ValueError, match="closed channel"):
        client.get_course(1)


@pytest.mark.parametrize(
    ("token", "where", "env"),
    [
        ("sécret", ["--token", "sécret"], {}),
        ("s3cret\r", [], {"ENROLLMENT_TOKEN": "s3cret\r"}),
        # The flag wins over the variable, so the flag is named.
        ("s3cr\tet", ["--token", "s3cr\tet"], {"ENROLLMENT_TOKEN": "fine"}),
    ],
)
def test_a_token_that_cannot_be_a_header_is_a_usage_error(live, token, where, env):
    # gRPC's core logged "Metadata value for key authorization is invalid" and every
    # call failed INTERNAL, as if the server had.
    named = "--token" if where else "ENROLLMENT_TOKEN"
    for json_flag in ([], ["--json"]):
        done = run(
            "--address", live.address, *where, *json_flag, "student", "--id", "1",
            env=_env(**env),
        )  # fmt: skip
        assert done.returncode == 2, (done.stdout, done.stderr)
        said = json.loads(done.stdout)["error"]["message"] if json_flag else done.stderr
        assert named in said and "printable ASCII" in said, said
        assert "etadata" not in said and "INTERNAL" not in said, said
        assert token.strip() not in done.stdout + done.stderr
        if not json_flag:
            assert done.stdout == "" and done.stderr.splitlines()[-1].startswith(
                "enrollment-client: error: "
            ), done.stderr


def test_the_libraries_refuse_a_token_that_cannot_be_a_header(live):
    from enrollment.client.aio import AsyncEnrollmentClient

    for token in ("é", "abc\r", "a\nb", "\x7f"):
        with pytest.raises(ValueError, match="token must be printable ASCII") as raised:
            EnrollmentClient(live.address, token=token)
        assert token not in str(raised.value)

        async def make(token: str = token) -> None:
            AsyncEnrollmentClient(live.address, token=token)

        with pytest.raises(ValueError, match="token must be printable ASCII"):
            asyncio.run(make())
    # Printable ASCII, spaces included, still goes out as it is.
    with EnrollmentClient(live.address, token="a b~!") as client:
        assert client.get_course(new_course(live.stub).id).id


@pytest.mark.parametrize("value", ["2147484", "1e10", "inf"])
def test_a_timeout_past_grpcs_longest_deadline_is_a_usage_error(live, value):
    # grpc took 1e10 s as a deadline already past: DEADLINE_EXCEEDED without a call.
    course = new_course(live.stub)
    done = run("--address", live.address, "--timeout", value, "course", "--id", str(course.id))
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr.splitlines()[-1].endswith(
        "argument --timeout: must be above 0 and at most 2147483 seconds (about 24 days)"
    ), done.stderr
    # The longest one allowed works.
    done = run("--address", live.address, "--timeout", "2147483", "course", "--id", str(course.id))
    assert done.returncode == 0, done.stderr
    with pytest.raises(ValueError, match="at most 2147483"):
        EnrollmentClient(live.address, timeout=1e10)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("bogus", "'bogus' has no port: give HOST:PORT, e.g. 127.0.0.1:50051"),
        ("127.0.0.1:99999", "the port of '127.0.0.1:99999' must be 0-65535"),
    ],
)
def test_a_bad_enrollment_address_names_the_variable_not_the_flag(address, expected):
    # The message said "argument --address" to someone who had set no such flag.
    done = run("student", "--id", "1", env=_env(ENROLLMENT_ADDRESS=address))
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr.splitlines()[-1] == (
        f"enrollment-client: error: environment variable ENROLLMENT_ADDRESS: {expected}"
    ), done.stderr
    done = run("--json", "student", "--id", "1", env=_env(ENROLLMENT_ADDRESS=address))
    message = json.loads(done.stdout)["error"]["message"]
    assert message == f"environment variable ENROLLMENT_ADDRESS: {expected}", message
    # A flag given as well wins, and the variable is not looked at.
    done = run("--address", "127.0.0.1:1", "--timeout", "1", "student", "--id", "1",
               env=_env(ENROLLMENT_ADDRESS=address))  # fmt: skip
    assert done.returncode == 1 and "UNAVAILABLE" in done.stderr, done.stderr


def test_output_that_the_terminal_cannot_encode_is_written_escaped_not_a_crash(live):
    # The student was created, then printing "Zoë" to an ASCII stdout was a
    # UnicodeEncodeError traceback and exit status 1: a success reported as a crash.
    ascii_only = _env(PYTHONIOENCODING="ascii")
    done = run("--address", live.address, "create-student", "--name", "Zoë",
               "--email", "zoe@x.org", env=ascii_only)  # fmt: skip
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert key_values(done.stdout)["name"] == "Zo\\xeb"
    # JSON stays JSON: escaped the JSON way.
    done = run("--address", live.address, "--json", "create-student", "--name", "Zoë ☃ 𝄞",
               "--email", "zoe2@x.org", env=ascii_only)  # fmt: skip
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert json.loads(done.stdout)["name"] == "Zoë ☃ 𝄞"
    # An error that quotes the input too.
    done = run("--address", live.address, "create-student", "--name", "Zoë",
               "--email", "zoe@x.org", env=ascii_only)  # fmt: skip
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("error: ALREADY_EXISTS"), done.stderr
