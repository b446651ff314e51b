"""A hypothesis state machine over create/update/enroll/drop/forced delete against a small model:
states, positions and counts compared with the server after every step."""

from __future__ import annotations

import grpc
from google.protobuf import field_mask_pb2
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from enrollment.v1 import enrollment_pb2 as pb
from tests import databases
from tests.rpc import TIMEOUT, failure

ENROLLED, WAITLISTED = pb.ENROLLMENT_STATE_ENROLLED, pb.ENROLLMENT_STATE_WAITLISTED


class Waitlists(RuleBasedStateMachine):
    stub = None
    url = ""

    def __init__(self):
        super().__init__()
        databases.empty_tables(self.url)
        self.students: list[int] = []
        # course id -> capacity, waitlist capacity, enrolled (set), waiting (in line order)
        self.courses: dict[int, dict] = {}
        self.serial = 0

    def call(self, method, request):
        """(response, None) or (None, (code, reason))."""
        try:
            return getattr(self.stub, method)(request, timeout=TIMEOUT), None
        except grpc.RpcError as error:
            got = failure(error)
            return None, (got.code, got.reason)

    @initialize()
    def a_small_full_world(self):
        """Five students and two small courses with waitlists, so lines form early."""
        for _ in range(7):
            self.create_student()
        self.create_course(1, 2)
        self.create_course(2, 3)

    def create_student(self):
        self.serial += 1
        got, err = self.call(
            "CreateStudent", pb.CreateStudentRequest(name="S", email=f"m{self.serial}@ex.org")
        )
        assert err is None
        self.students.append(got.student.id)

    @rule(capacity=st.sampled_from([0, 1, 1, 2, 3]), waitlist=st.integers(0, 3))
    def create_course(self, capacity, waitlist):
        self.serial += 1
        got, err = self.call(
            "CreateCourse",
            pb.CreateCourseRequest(
                code=f"M-{self.serial}", title="T", capacity=capacity, waitlist_capacity=waitlist
            ),
        )
        assert err is None
        self.courses[got.course.id] = {
            "cap": capacity, "wcap": waitlist, "enrolled": set(), "waiting": [],
        }  # fmt: skip

    def _pick(self, data, pool):
        return data.draw(st.sampled_from(sorted(pool)))

    @precondition(lambda self: self.students and self.courses)
    @rule(data=st.data())
    def enroll_or_wait(self, data):
        """Asks for the waitlist (the rule hypothesis picks as often as any other)."""
        self.enroll(data, True)

    @precondition(lambda self: self.students and self.courses)
    @rule(data=st.data(), wait=st.booleans())
    def enroll(self, data, wait):
        s, c = self._pick(data, self.students), self._pick(data, self.courses)
        m = self.courses[c]
        got, err = self.call(
            "EnrollStudent",
            pb.EnrollStudentRequest(student_id=s, course_id=c, waitlist_if_full=wait),
        )
        if s in m["enrolled"]:
            assert err == (grpc.StatusCode.ALREADY_EXISTS, "ALREADY_ENROLLED")
        elif s in m["waiting"]:
            assert err == (grpc.StatusCode.ALREADY_EXISTS, "ALREADY_WAITLISTED")
        elif m["cap"] == 0 or len(m["enrolled"]) < m["cap"]:
            assert err is None and got.enrollment.state == ENROLLED
            m["enrolled"].add(s)
        elif wait and m["wcap"] and len(m["waiting"]) < m["wcap"]:
            assert err is None and got.enrollment.state == WAITLISTED
            m["waiting"].append(s)
            assert got.enrollment.waitlist_position == len(m["waiting"])
        elif wait and m["wcap"]:
            assert err == (grpc.StatusCode.FAILED_PRECONDITION, "WAITLIST_FULL")
        else:
            assert err == (grpc.StatusCode.FAILED_PRECONDITION, "COURSE_FULL")

    def _drop_model(self, s, c) -> int | None:
        m = self.courses[c]
        if s in m["waiting"]:
            m["waiting"].remove(s)
            return None
        m["enrolled"].discard(s)
        if m["waiting"]:
            first = m["waiting"].pop(0)
            m["enrolled"].add(first)
            return first
        return None

    @precondition(lambda self: self.students and self.courses)
    @rule(data=st.data())
    def drop(self, data):
        c = self._pick(data, self.courses)
        m = self.courses[c]
        # Mostly someone in the course (enrolled ones most), so promotions happen often.
        members = sorted(m["enrolled"]) * 3 + m["waiting"]
        s = data.draw(st.sampled_from(members or self.students)) if members else None
        if s is None or data.draw(st.integers(0, 9)) == 0:
            s = self._pick(data, self.students)
        got, err = self.call("DropCourse", pb.DropCourseRequest(student_id=s, course_id=c))
        if s not in m["enrolled"] and s not in m["waiting"]:
            assert err == (grpc.StatusCode.NOT_FOUND, "NOT_ENROLLED")
            return
        promoted = self._drop_model(s, c)
        assert err is None
        if promoted is None:
            assert not got.HasField("promoted")
        else:
            assert (got.promoted.student_id, got.promoted.state) == (promoted, ENROLLED)

    @precondition(lambda self: self.courses)
    @rule(data=st.data(), capacity=st.integers(0, 4), waitlist=st.integers(0, 3))
    def update_course(self, data, capacity, waitlist):
        c = self._pick(data, self.courses)
        m = self.courses[c]
        paths = data.draw(
            st.sampled_from(
                [["capacity"], ["waitlist_capacity"], ["capacity", "waitlist_capacity"]]
            )
        )
        new_cap = capacity if "capacity" in paths else m["cap"]
        new_wcap = waitlist if "waitlist_capacity" in paths else m["wcap"]
        _, err = self.call(
            "UpdateCourse",
            pb.UpdateCourseRequest(
                course=pb.Course(id=c, capacity=capacity, waitlist_capacity=waitlist),
                update_mask=field_mask_pb2.FieldMask(paths=paths),
            ),
        )
        enrolled, waiting = len(m["enrolled"]), len(m["waiting"])
        if "capacity" in paths and new_cap and new_cap < enrolled:
            assert err == (grpc.StatusCode.FAILED_PRECONDITION, "CAPACITY_BELOW_ENROLLMENT")
            return
        seats = waiting if new_cap == 0 else max(0, new_cap - enrolled)
        promoted = min(seats, waiting)
        if "waitlist_capacity" in paths and new_wcap < waiting - promoted:
            assert err == (grpc.StatusCode.FAILED_PRECONDITION, "WAITLIST_BELOW_WAITING")
            return
        assert err is None
        m["cap"], m["wcap"] = new_cap, new_wcap
        for _ in range(promoted):
            m["enrolled"].add(m["waiting"].pop(0))

    @precondition(lambda self: self.students)
    @rule(data=st.data())
    def delete_student(self, data):
        s = self._pick(data, self.students)
        _, err = self.call("DeleteStudent", pb.DeleteStudentRequest(student_id=s, force=True))
        assert err is None
        for c in sorted(self.courses):
            m = self.courses[c]
            if s in m["enrolled"] or s in m["waiting"]:
                self._drop_model(s, c)
        self.students.remove(s)

    @precondition(lambda self: self.courses)
    @rule(data=st.data())
    def delete_course(self, data):
        c = self._pick(data, self.courses)
        _, err = self.call("DeleteCourse", pb.DeleteCourseRequest(course_id=c, force=True))
        assert err is None
        del self.courses[c]

    @invariant()
    def server_matches_model(self):
        for c, m in self.courses.items():
            got, err = self.call("GetCourse", pb.GetCourseRequest(course_id=c))
            assert err is None
            course = got.course
            assert (course.capacity, course.waitlist_capacity) == (m["cap"], m["wcap"])
            assert (course.enrolled_count, course.waitlisted_count) == (
                len(m["enrolled"]), len(m["waiting"]),
            )  # fmt: skip
            got, _ = self.call(
                "ListEnrollments", pb.ListEnrollmentsRequest(course_id=c, state=WAITLISTED)
            )
            assert [(e.student_id, e.waitlist_position, e.state) for e in got.enrollments] == [
                (s, n, WAITLISTED) for n, s in enumerate(m["waiting"], start=1)
            ]
            got, _ = self.call(
                "ListEnrollments", pb.ListEnrollmentsRequest(course_id=c, state=ENROLLED)
            )
            assert {e.student_id for e in got.enrollments} == m["enrolled"]
            assert all(e.waitlist_position == 0 for e in got.enrollments)


def test_waitlists_follow_the_model(live):
    Waitlists.stub, Waitlists.url = live.stub, live.database_url
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        Waitlists,
        settings=settings(
            max_examples=30,
            stateful_step_count=50,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        ),
    )
