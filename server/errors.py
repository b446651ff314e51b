"""Domain errors: each names its status code and ErrorInfo reason, and knows nothing of gRPC."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TypeVar


@dataclass(frozen=True)
class FieldViolation:
    field: str
    description: str


@dataclass(eq=False)  # exceptions compare and hash by identity
class EnrollmentError(Exception):
    """Base of every error a caller is meant to see; code is a grpc.StatusCode name."""

    message: str
    metadata: dict[str, str] = field(default_factory=dict)
    violations: tuple[FieldViolation, ...] = ()

    code = "INTERNAL"
    reason = "INTERNAL"

    def __str__(self) -> str:
        return self.message


E = TypeVar("E", bound=EnrollmentError)


def in_batch(error: E, index: int, *, call: bool) -> E:
    """Item `index` of a batch's error: field paths prefixed "requests[i].". call: the
    error fails the whole call, so its message says which item and ErrorInfo metadata
    "index" names it."""
    prefix = f"requests[{index}]."
    violations = tuple(FieldViolation(prefix + v.field, v.description) for v in error.violations)
    if not call:
        return dataclasses.replace(error, violations=violations)
    return dataclasses.replace(
        error,
        message=f"requests[{index}]: {error.message}",
        metadata={**error.metadata, "index": str(index)},
        violations=violations,
    )


class InvalidField(EnrollmentError):
    code, reason = "INVALID_ARGUMENT", "INVALID_FIELD"

    @classmethod
    def of(
        cls, violations: list[FieldViolation], metadata: dict[str, str] | None = None
    ) -> InvalidField:
        message = "; ".join(f"{v.field}: {v.description}" for v in violations)
        return cls(message, metadata=dict(metadata or {}), violations=tuple(violations))


class RequestTooLarge(EnrollmentError):
    """A request message over --max-message-bytes (its size once decompressed)."""

    code, reason = "RESOURCE_EXHAUSTED", "REQUEST_TOO_LARGE"

    @classmethod
    def of(cls, size: int, limit: int) -> RequestTooLarge:
        return cls(
            f"the request message is {size} bytes; this server accepts at most {limit}",
            {"max_message_bytes": str(limit), "message_bytes": str(size)},
        )


class UnknownCourseArgument(EnrollmentError):
    """A course named in EnrollStudent/DropCourse that does not exist: the request is wrong."""

    code, reason = "INVALID_ARGUMENT", "COURSE_NOT_FOUND"

    @classmethod
    def of(cls, course_id: int) -> UnknownCourseArgument:
        return cls(
            f"course {course_id} does not exist",
            metadata={"course_id": str(course_id)},
            violations=(FieldViolation("course_id", f"course {course_id} does not exist"),),
        )


class StudentNotFound(EnrollmentError):
    code, reason = "NOT_FOUND", "STUDENT_NOT_FOUND"

    @classmethod
    def of(cls, student_id: int) -> StudentNotFound:
        return cls(f"student {student_id} does not exist", {"student_id": str(student_id)})


class CourseNotFound(EnrollmentError):
    code, reason = "NOT_FOUND", "COURSE_NOT_FOUND"

    @classmethod
    def of(cls, course_id: int) -> CourseNotFound:
        return cls(f"course {course_id} does not exist", {"course_id": str(course_id)})


def _pair(student_id: int, course_id: int) -> dict[str, str]:
    return {"student_id": str(student_id), "course_id": str(course_id)}


class AlreadyEnrolled(EnrollmentError):
    code, reason = "ALREADY_EXISTS", "ALREADY_ENROLLED"

    @classmethod
    def of(cls, student_id: int, course_id: int) -> AlreadyEnrolled:
        return cls(
            f"student {student_id} is already enrolled in course {course_id}",
            _pair(student_id, course_id),
        )


class CourseFull(EnrollmentError):
    code, reason = "FAILED_PRECONDITION", "COURSE_FULL"

    @classmethod
    def of(cls, course_id: int, capacity: int) -> CourseFull:
        return cls(
            f"course {course_id} is full (capacity {capacity})",
            {"course_id": str(course_id), "capacity": str(capacity)},
        )


class NotEnrolled(EnrollmentError):
    code, reason = "NOT_FOUND", "NOT_ENROLLED"

    @classmethod
    def of(cls, student_id: int, course_id: int) -> NotEnrolled:
        return cls(
            f"student {student_id} is not enrolled in course {course_id}",
            _pair(student_id, course_id),
        )


class EmailTaken(EnrollmentError):
    code, reason = "ALREADY_EXISTS", "EMAIL_TAKEN"

    @classmethod
    def of(cls) -> EmailTaken:
        return cls("a student with this email already exists")


class CourseCodeTaken(EnrollmentError):
    code, reason = "ALREADY_EXISTS", "COURSE_CODE_TAKEN"

    @classmethod
    def of(cls) -> CourseCodeTaken:
        return cls("a course with this code already exists")


class HasEnrollments(EnrollmentError):
    code, reason = "FAILED_PRECONDITION", "HAS_ENROLLMENTS"

    @classmethod
    def of(cls, what: str, ident: int, count: int) -> HasEnrollments:
        return cls(
            f"{what} {ident} has {count} enrollment(s); drop them first or set force",
            {f"{what}_id": str(ident), "enrollments": str(count)},
        )


class DatabaseUnavailable(EnrollmentError):
    code, reason = "UNAVAILABLE", "DATABASE_UNAVAILABLE"

    @classmethod
    def of(cls) -> DatabaseUnavailable:
        return cls("the database is unavailable; retry the call")

    @classmethod
    def read_only(cls) -> DatabaseUnavailable:
        """The database accepts no writes now (a failover in progress, a replica)."""
        return cls("the database is read-only now; nothing was changed, retry the call later")


class CommitOutcomeUnknown(EnrollmentError):
    """The COMMIT's answer was lost (the connection failed, or a timeout struck while it
    ran): the write may or may not have been made.

    Unlike DatabaseUnavailable this does not say "nothing changed"; the server never
    runs such a call again by itself.
    """

    code, reason = "UNAVAILABLE", "COMMIT_OUTCOME_UNKNOWN"

    @classmethod
    def of(cls) -> CommitOutcomeUnknown:
        return cls(
            "the database did not confirm the commit (the connection failed or timed out "
            "while committing): the change may have been made; check before retrying"
        )


class StorageFull(EnrollmentError):
    """The database has no space left for the write; nothing was changed."""

    code, reason = "UNAVAILABLE", "STORAGE_FULL"

    @classmethod
    def of(cls) -> StorageFull:
        return cls("the database's storage is full; nothing was changed, retry later")


class Unauthenticated(EnrollmentError):
    """A bearer token that matches no configured token."""

    code, reason = "UNAUTHENTICATED", "INVALID_TOKEN"

    @classmethod
    def of(cls) -> Unauthenticated:
        return cls("the bearer token is not valid")


class MissingToken(Unauthenticated):
    """No 'authorization: Bearer <token>' metadata at all."""

    reason = "MISSING_TOKEN"

    @classmethod
    def of(cls) -> MissingToken:
        return cls("this call needs the metadata 'authorization: Bearer <token>'")


class AuthFailuresLimited(EnrollmentError):
    """This peer sent too many wrong tokens lately; its calls wait for its bucket to refill."""

    code, reason = "RESOURCE_EXHAUSTED", "AUTH_FAILURES_LIMITED"

    @classmethod
    def of(cls, retry_after: float) -> AuthFailuresLimited:
        seconds = f"{retry_after:.1f}"
        return cls(
            f"too many failed authentications from this address; retry in {seconds}s",
            {"retry_after_seconds": seconds},
        )


class PermissionDenied(EnrollmentError):
    code, reason = "PERMISSION_DENIED", "ROLE_TOO_LOW"

    @classmethod
    def of(cls, method: str, role: str, needed: str) -> PermissionDenied:
        return cls(
            f"{method} needs the {needed} role; this token has {role}",
            {"method": method, "role": role, "required_role": needed},
        )


class CallEnded(EnrollmentError):
    """The caller's deadline passed or it cancelled; the work so far is rolled back.

    Raised where the database work finds it (callstate), which does not know which of
    the two it was: the transport answers with because(...), whose code says which. A
    caller that cancelled never reads its answer; one whose deadline passed may, when
    the server's answer arrives before its own grpc gives up."""

    code, reason = "CANCELLED", "CALL_ENDED"

    @classmethod
    def of(cls) -> CallEnded:
        return cls("the call was cancelled before its work committed; nothing changed")

    @staticmethod
    def because(code: str) -> CallEnded:
        """The error a call that ended this way (its status code's name) is answered with."""
        return DeadlinePassed.of() if code == "DEADLINE_EXCEEDED" else CallEnded.of()


class DeadlinePassed(CallEnded):
    """A CallEnded whose caller's deadline passed: answered as its grpc would answer."""

    code = "DEADLINE_EXCEEDED"

    @classmethod
    def of(cls) -> DeadlinePassed:
        return cls("the call's deadline passed before its work committed; nothing changed")


class RequestTimeout(EnrollmentError):
    """The call's request message did not arrive within the server's bound
    (--request-timeout): the call is ended before any work, so that a client that
    opens calls and never sends their body holds nothing for long."""

    code, reason = "DEADLINE_EXCEEDED", "REQUEST_TIMEOUT"

    @classmethod
    def of(cls, seconds: float) -> RequestTimeout:
        return cls(
            f"the request message did not arrive within {seconds:g} s of the call's start",
            {"timeout_seconds": f"{seconds:g}"},
        )


class EtagMismatch(EnrollmentError):
    code, reason = "ABORTED", "ETAG_MISMATCH"

    @classmethod
    def of(cls, what: str, ident: int) -> EtagMismatch:
        return cls(
            # Not "it has changed": the etag may never have been one of its.
            f"the etag is not {what} {ident}'s current one (it changed since that etag was "
            "read, or the etag was never its); read it again and retry",
            {f"{what}_id": str(ident)},
        )


class AlreadyWaitlisted(EnrollmentError):
    code, reason = "ALREADY_EXISTS", "ALREADY_WAITLISTED"

    @classmethod
    def of(cls, student_id: int, course_id: int) -> AlreadyWaitlisted:
        return cls(
            f"student {student_id} is already on the waitlist of course {course_id}",
            _pair(student_id, course_id),
        )


class WaitlistFull(EnrollmentError):
    code, reason = "FAILED_PRECONDITION", "WAITLIST_FULL"

    @classmethod
    def of(cls, course_id: int, waitlist_capacity: int) -> WaitlistFull:
        return cls(
            f"course {course_id} is full and so is its waitlist "
            f"(waitlist_capacity {waitlist_capacity})",
            {"course_id": str(course_id), "waitlist_capacity": str(waitlist_capacity)},
        )


class CapacityBelowEnrollment(EnrollmentError):
    code, reason = "FAILED_PRECONDITION", "CAPACITY_BELOW_ENROLLMENT"

    @classmethod
    def of(cls, course_id: int, capacity: int, enrolled: int) -> CapacityBelowEnrollment:
        return cls(
            f"course {course_id} has {enrolled} students enrolled; capacity {capacity} "
            "would be below that",
            {"course_id": str(course_id), "enrolled_count": str(enrolled)},
        )


class WaitlistBelowWaiting(EnrollmentError):
    code, reason = "FAILED_PRECONDITION", "WAITLIST_BELOW_WAITING"

    @classmethod
    def of(cls, course_id: int, waitlist_capacity: int, waiting: int) -> WaitlistBelowWaiting:
        return cls(
            f"course {course_id} would still have {waiting} students waiting; "
            f"waitlist_capacity {waitlist_capacity} would be below that",
            {"course_id": str(course_id), "waitlisted_count": str(waiting)},
        )


class EventsExpired(EnrollmentError):
    code, reason = "OUT_OF_RANGE", "EVENTS_EXPIRED"

    @classmethod
    def of(cls, after_sequence: int, purged: int) -> EventsExpired:
        return cls(
            f"events after sequence {after_sequence} were removed by the retention "
            f"(up to sequence {purged}); start again from a later sequence",
            {"after_sequence": str(after_sequence), "purged_sequence": str(purged)},
        )


class TooManyWatchers(EnrollmentError):
    code, reason = "RESOURCE_EXHAUSTED", "TOO_MANY_WATCHERS"

    @classmethod
    def of(cls, limit: int) -> TooManyWatchers:
        if limit == 0:
            return cls(
                "this server serves no WatchEvents streams (--max-watchers 0); "
                "read the change feed with ListEvents",
                {"max_watchers": "0"},
            )
        return cls(
            f"this server already serves {limit} WatchEvents streams; retry later",
            {"max_watchers": str(limit)},
        )


class WatcherTooSlow(EnrollmentError):
    code, reason = "RESOURCE_EXHAUSTED", "WATCHER_TOO_SLOW"

    @classmethod
    def of(cls, last_sequence: int) -> WatcherTooSlow:
        return cls(
            "the stream fell too far behind; resume with after_sequence = the last "
            "sequence received",
            {"last_sequence": str(last_sequence)},
        )


class ShuttingDown(EnrollmentError):
    code, reason = "UNAVAILABLE", "SHUTTING_DOWN"

    @classmethod
    def of(cls) -> ShuttingDown:
        return cls(
            "the server is shutting down; resume with after_sequence = the last sequence received"
        )


class RequestIdReused(EnrollmentError):
    code, reason = "INVALID_ARGUMENT", "REQUEST_ID_REUSED"

    @classmethod
    def of(cls, field: str = "request_id") -> RequestIdReused:
        text = "this request_id was used before with another method or a different request"
        return cls(text, violations=(FieldViolation(field, text),))
