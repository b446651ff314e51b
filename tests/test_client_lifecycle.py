"""The client library and CLI for v1.1: updates, waitlists, enrollments as a resource."""

from __future__ import annotations

import pytest

from enrollment.client.api import ClientError, EnrollmentClient
from enrollment.v1 import enrollment_pb2 as pb
from tests.client_cli import cli, key_values, ok, ok_json


def test_library_waitlist_story_and_updates(live):
    with EnrollmentClient(live.address, timeout=10) as api:
        course = api.create_course("WL-1", "Waitlisted", capacity=1, waitlist_capacity=2)
        a, b, c = (api.create_student(n, f"{n}@example.org") for n in ("ann", "bob", "cy"))
        assert api.enroll(a.id, course.id).state == pb.ENROLLMENT_STATE_ENROLLED
        waiting = api.enroll(b.id, course.id, waitlist_if_full=True)
        assert (waiting.state, waiting.waitlist_position) == (pb.ENROLLMENT_STATE_WAITLISTED, 1)
        api.enroll(c.id, course.id, waitlist_if_full=True)
        line = api.iter_enrollments(course_id=course.id, state=pb.ENROLLMENT_STATE_WAITLISTED)
        assert [e.student_id for e in line] == [b.id, c.id]
        promoted = api.drop(a.id, course.id)
        assert promoted is not None and promoted.student_id == b.id
        assert api.get_enrollment(b.id, course.id).state == pb.ENROLLMENT_STATE_ENROLLED
        assert api.drop(c.id, course.id) is None
        everything = list(api.iter_enrollments(page_size=1))
        assert [(e.course_id, e.student_id) for e in everything] == [(course.id, b.id)]

        raised = api.update_course(course.id, capacity=3, etag=course.etag)
        assert (raised.capacity, raised.etag != course.etag) == (3, True)
        with pytest.raises(ClientError) as stale:
            api.update_course(course.id, title="Old", etag=course.etag)
        assert (stale.value.code, stale.value.reason) == ("ABORTED", "ETAG_MISMATCH")
        renamed = api.update_student(a.id, name="Ann B")
        assert (renamed.name, renamed.email) == ("Ann B", a.email)


def test_cli_subcommands(live):
    course = ok_json(live, "create-course", "--code", "WL-2", "--title", "T", "--capacity", "1",
                     "--waitlist-capacity", "1")  # fmt: skip
    cid = course["id"]
    s1 = ok_json(live, "create-student", "--name", "A", "--email", "a1@example.org")["id"]
    s2 = ok_json(live, "create-student", "--name", "B", "--email", "b1@example.org")["id"]
    ok(live, "enroll", "--student", s1, "--course", cid)
    waited = key_values(ok(live, "enroll", "--student", s2, "--course", cid, "--waitlist"))
    assert (waited["state"], waited["waitlist_position"]) == ("waitlisted", "1")
    shown = key_values(ok(live, "enrollment", "--student", s2, "--course", cid))
    assert shown["state"] == "waitlisted" and shown["enroll_time"] == "-"
    table = ok(live, "enrollments", "--course", cid, "--waitlisted").splitlines()
    assert table[0].split() == ["COURSE", "STUDENT", "STATE", "POSITION", "ENROLLED"]
    assert table[1].split()[:4] == [cid, s2, "waitlisted", "1"]
    listed = ok_json(live, "enrollments", "--course", cid, "--all")
    assert [e["studentId"] for e in listed["enrollments"]] == [s1, s2]
    assert "took the seat" in ok(live, "drop", "--student", s1, "--course", cid)
    updated = key_values(ok(live, "update-course", "--id", cid, "--capacity", "40"))
    assert (updated["capacity"], updated["waitlist_capacity"]) == ("40", "1")
    # The etag shown is the one an update takes.
    ok(live, "update-course", "--id", cid, "--title", "U", "--etag", updated["etag"])
    stale = cli(live, "update-course", "--id", cid, "--title", "V", "--etag", updated["etag"])
    assert stale.returncode == 1 and "ETAG_MISMATCH" in stale.stderr
    refused = cli(live, "update-course", "--id", cid, "--capacity", "-1")
    assert refused.returncode == 1 and "course.capacity" in refused.stderr
    ok(live, "update-student", "--id", s1, "--email", "new@example.org")
    assert ok_json(live, "student", "--id", s1)["email"] == "new@example.org"
