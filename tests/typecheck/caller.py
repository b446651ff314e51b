"""A backend calling the service through the client library, as its authors would write it;
`make lint` type-checks it with `mypy --strict` (it is never run)."""

from __future__ import annotations

import asyncio

from enrollment.client.aio import AsyncEnrollmentClient
from enrollment.client.api import ClientError, EnrollmentClient
from enrollment.v1 import enrollment_pb2 as pb


def seats_left(course: pb.Course) -> int | None:
    return None if course.capacity == 0 else course.capacity - course.enrolled_count


def enroll_everyone(address: str, course_id: int, emails: list[str]) -> dict[str, str]:
    outcome: dict[str, str] = {}
    with EnrollmentClient(address, timeout=2.0, lb_policy="round_robin") as api:
        for email in emails:
            student: pb.Student = api.create_student(email.split("@")[0], email)
            try:
                enrollment: pb.Enrollment = api.enroll(student.id, course_id)
                outcome[email] = f"enrolled at {enrollment.enroll_time.ToDatetime():%H:%M}"
            except ClientError as error:
                outcome[email] = error.reason or error.code
                fields: list[str] = error.fields
                assert all(isinstance(f, str) for f in fields)
        course = api.get_course(course_id)
        print(course.code, seats_left(course))
        codes: list[str] = [c.code for c in api.iter_courses(page_size=100)]
        page: pb.ListStudentsResponse = api.list_students(course_id, page_size=10)
        print(codes, page.next_page_token)
    return outcome


async def roster(address: str, course_id: int) -> list[tuple[int, str]]:
    async with AsyncEnrollmentClient(address, timeout=2.0, token="t") as api:
        first: pb.Student = await api.get_student(1)
        everyone = [(s.id, s.email) async for s in api.iter_students(course_id)]
        await api.drop(first.id, course_id)
        return everyone


if __name__ == "__main__":
    print(asyncio.run(roster("127.0.0.1:50051", 1)))
