"""The enrollment-client command: one subcommand per EnrollmentService RPC."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from enrollment.client import bulk
from enrollment.client.api import DEFAULT_TIMEOUT, ClientError, EnrollmentClient
from enrollment.v1 import enrollment_pb2 as pb

DEFAULT_ADDRESS = "127.0.0.1:50051"

EPILOG = """\
output: readable by default ("key: value" lines for one item, a table for a list,
then "next page: TOKEN" when there are more). With --json: the item as a JSON
object, or for a list {"students"|"courses"|"enrollments": [...],
"next_page_token": "..."}; delete-student and delete-course print {}, drop {} or
{"promoted": {...}}. JSON follows the protobuf JSON
mapping with proto field names: int64 values (ids) are strings, timestamps are
RFC 3339 strings, and every field is present, zero values included.

errors: exit status 1 and one line on stderr,
  error: CODE REASON: message
followed by "  field: NAME" for each offending request field; with --json the
error goes to stdout as {"error": {"code", "reason", "message", "fields"}}.
Usage errors exit with status 2.

global options may also follow the subcommand."""


# Results a subcommand hands to the renderer.


@dataclass
class Item:
    message: Message


@dataclass
class Listing:
    response: Message
    items: Sequence[Message]
    next_page_token: str
    noun: str


@dataclass
class Done:
    text: str
    message: Message


# Argument types: only what protobuf cannot encode is refused here; everything
# else (0, negative ids, blank names) goes to the server, whose answer is the contract.


def _integer(bits: int) -> Callable[[str], int]:
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} does not fit in int{bits}")
        return value

    parse.__name__ = f"int{bits}"
    return parse


int64 = _integer(64)
int32 = _integer(32)


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


# Subcommands.


def _create_student(client: EnrollmentClient, args: argparse.Namespace) -> Item:
    return Item(client.create_student(args.name, args.email))


def _get_student(client: EnrollmentClient, args: argparse.Namespace) -> Item:
    return Item(client.get_student(args.id))


def _list_students(client: EnrollmentClient, args: argparse.Namespace) -> Listing:
    if args.all:
        students = list(
            client.iter_students(args.course, page_size=args.page_size, page_token=args.page_token)
        )
        return Listing(pb.ListStudentsResponse(students=students), students, "", "students")
    page = client.list_students(args.course, args.page_size, args.page_token)
    return Listing(page, page.students, page.next_page_token, "students")


def _delete_student(client: EnrollmentClient, args: argparse.Namespace) -> Done:
    client.delete_student(args.id, force=args.force)
    return Done(f"deleted student {args.id}", pb.DeleteStudentResponse())


def _create_course(client: EnrollmentClient, args: argparse.Namespace) -> Item:
    return Item(client.create_course(args.code, args.title, args.capacity, args.waitlist_capacity))


def _update_course(client: EnrollmentClient, args: argparse.Namespace) -> Item:
    return Item(
        client.update_course(
            args.id,
            code=args.code,
            title=args.title,
            capacity=args.capacity,
            waitlist_capacity=args.waitlist_capacity,
            etag=args.etag,
        )
    )


def _update_student(client: EnrollmentClient, args: argparse.Namespace) -> Item:
    return Item(client.update_student(args.id, name=args.name, email=args.email, etag=args.etag))


def _get_course(client: EnrollmentClient, args: argparse.Namespace) -> Item:
    return Item(client.get_course(args.id))


def _list_courses(client: EnrollmentClient, args: argparse.Namespace) -> Listing:
    if args.all:
        courses = list(
            client.iter_courses(args.student, page_size=args.page_size, page_token=args.page_token)
        )
        return Listing(pb.ListCoursesResponse(courses=courses), courses, "", "courses")
    page = client.list_courses(args.student, args.page_size, args.page_token)
    return Listing(page, page.courses, page.next_page_token, "courses")


def _delete_course(client: EnrollmentClient, args: argparse.Namespace) -> Done:
    client.delete_course(args.id, force=args.force)
    return Done(f"deleted course {args.id}", pb.DeleteCourseResponse())


def _enroll(client: EnrollmentClient, args: argparse.Namespace) -> Item:
    return Item(client.enroll(args.student, args.course, waitlist_if_full=args.waitlist))


def _drop(client: EnrollmentClient, args: argparse.Namespace) -> Done:
    promoted = client.drop(args.student, args.course)
    text = f"dropped student {args.student} from course {args.course}"
    if promoted is None:
        return Done(text, pb.DropCourseResponse())
    text += f"; student {promoted.student_id} took the seat from the waitlist"
    return Done(text, pb.DropCourseResponse(promoted=promoted))


def _get_enrollment(client: EnrollmentClient, args: argparse.Namespace) -> Item:
    return Item(client.get_enrollment(args.student, args.course))


def _list_enrollments(client: EnrollmentClient, args: argparse.Namespace) -> Listing:
    state = (
        pb.ENROLLMENT_STATE_WAITLISTED
        if args.waitlisted
        else pb.ENROLLMENT_STATE_ENROLLED
        if args.enrolled
        else pb.ENROLLMENT_STATE_UNSPECIFIED
    )
    if args.all:
        found = list(
            client.iter_enrollments(
                args.student,
                args.course,
                state,
                page_size=args.page_size,
                page_token=args.page_token,
            )
        )
        return Listing(pb.ListEnrollmentsResponse(enrollments=found), found, "", "enrollments")
    page = client.list_enrollments(
        args.student, args.course, state, args.page_size, args.page_token
    )
    return Listing(page, page.enrollments, page.next_page_token, "enrollments")


def _global_options(parser: argparse.ArgumentParser, *, in_subcommand: bool) -> None:
    # In a subcommand the defaults are SUPPRESS, so an option given there overrides
    # the one given before the subcommand and an absent one leaves it alone.
    def default(value):
        return argparse.SUPPRESS if in_subcommand else value

    parser.add_argument(
        "--address",
        metavar="HOST:PORT",
        default=default(os.environ.get("ENROLLMENT_ADDRESS", DEFAULT_ADDRESS)),
        help=f"server address (env ENROLLMENT_ADDRESS; default {DEFAULT_ADDRESS})",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=seconds,
        default=default(DEFAULT_TIMEOUT),
        help=f"deadline of each call, in seconds (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print results and errors as JSON on stdout",
    )
    parser.add_argument(
        "--token",
        default=default(os.environ.get("ENROLLMENT_TOKEN")),
        help="bearer token sent with every call (env ENROLLMENT_TOKEN)",
    )
    # No environment variables here: ENROLLMENT_TLS_CERT/KEY name the server's own files.
    for flag, text in (
        ("--tls-ca", "use TLS, trusting the CA (PEM) that signed the server's certificate"),
        ("--tls-cert", "client certificate (PEM) for mutual TLS; TLS on, system CAs by default"),
        ("--tls-key", "private key (PEM) of --tls-cert"),
    ):
        parser.add_argument(flag, metavar="PEM", default=default(None), help=text)


def _page_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--page-size",
        type=int32,
        default=0,
        metavar="N",
        help="rows per page (default 0: the server's default of 50; at most 1000)",
    )
    parser.add_argument(
        "--page-token",
        default="",
        metavar="TOKEN",
        help="the 'next page' token of the previous page",
    )
    parser.add_argument(
        "--all",
        action="store_true",
        help="fetch every page (from --page-token on) and print them as one list",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enrollment-client",
        description="Call the enrollment.v1.EnrollmentService API.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _global_options(parser, in_subcommand=False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    def add(name: str, run, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        _global_options(sub, in_subcommand=True)
        sub.set_defaults(run=run)
        return sub

    sub = add("create-student", _create_student, "create a student (CreateStudent)")
    sub.add_argument("--name", required=True)
    sub.add_argument("--email", required=True)

    sub = add("student", _get_student, "show one student (GetStudent)")
    sub.add_argument("--id", type=int64, required=True, metavar="N")

    sub = add("students", _list_students, "list students, or one course's roster (ListStudents)")
    sub.add_argument(
        "--course", type=int64, default=0, metavar="N", help="only students enrolled in course N"
    )
    _page_options(sub)

    sub = add("delete-student", _delete_student, "delete a student (DeleteStudent)")
    sub.add_argument("--id", type=int64, required=True, metavar="N")
    sub.add_argument("--force", action="store_true", help="also drop the student's enrollments")

    sub = add("create-course", _create_course, "create a course (CreateCourse)")
    sub.add_argument("--code", required=True, help="unique code such as CS-101")
    sub.add_argument("--title", required=True)
    sub.add_argument(
        "--capacity",
        type=int32,
        default=0,
        metavar="N",
        help="most students (0, the default: no limit)",
    )
    sub.add_argument(
        "--waitlist-capacity",
        type=int32,
        default=0,
        metavar="N",
        help="most students waiting when it is full (0, the default: no waitlist)",
    )

    sub = add("update-course", _update_course, "change a course (UpdateCourse; admin)")
    sub.add_argument("--id", type=int64, required=True, metavar="N")
    sub.add_argument("--code", help="new code")
    sub.add_argument("--title", help="new title")
    sub.add_argument(
        "--capacity", type=int32, metavar="N", help="new capacity (0: no limit); raising it "
        "promotes waitlisted students"
    )  # fmt: skip
    sub.add_argument("--waitlist-capacity", type=int32, metavar="N", help="new waitlist size")
    sub.add_argument("--etag", default="", help="refuse the change if the course moved since")

    sub = add("update-student", _update_student, "change a student (UpdateStudent; admin)")
    sub.add_argument("--id", type=int64, required=True, metavar="N")
    sub.add_argument("--name", help="new name")
    sub.add_argument("--email", help="new email")
    sub.add_argument("--etag", default="", help="refuse the change if the student moved since")

    sub = add("course", _get_course, "show one course (GetCourse)")
    sub.add_argument("--id", type=int64, required=True, metavar="N")

    sub = add("courses", _list_courses, "list courses, or one student's courses (ListCourses)")
    sub.add_argument(
        "--student", type=int64, default=0, metavar="N", help="only courses student N is in"
    )
    _page_options(sub)

    sub = add("delete-course", _delete_course, "delete a course (DeleteCourse)")
    sub.add_argument("--id", type=int64, required=True, metavar="N")
    sub.add_argument("--force", action="store_true", help="also remove its enrollments")

    sub = add("enroll", _enroll, "enroll a student in a course (EnrollStudent)")
    sub.add_argument("--student", type=int64, required=True, metavar="N")
    sub.add_argument("--course", type=int64, required=True, metavar="N")
    sub.add_argument(
        "--waitlist", action="store_true", help="join the waitlist when the course is full"
    )

    sub = add("enrollment", _get_enrollment, "show one enrollment (GetEnrollment)")
    sub.add_argument("--student", type=int64, required=True, metavar="N")
    sub.add_argument("--course", type=int64, required=True, metavar="N")

    sub = add("enrollments", _list_enrollments, "list enrollments (ListEnrollments)")
    sub.add_argument("--student", type=int64, default=0, metavar="N", help="only student N's")
    sub.add_argument("--course", type=int64, default=0, metavar="N", help="only course N's")
    states = sub.add_mutually_exclusive_group()
    states.add_argument(
        "--waitlisted", action="store_true", help="only waiting entries (with --course: in line)"
    )
    states.add_argument("--enrolled", action="store_true", help="only enrolled entries")
    _page_options(sub)

    sub = add("drop", _drop, "remove a student from a course (DropCourse)")
    sub.add_argument("--student", type=int64, required=True, metavar="N")
    sub.add_argument("--course", type=int64, required=True, metavar="N")

    sub = add(
        "import",
        _import,
        "enroll the rows of a CSV file (columns student_id,course_id or email,course_code; "
        "header required) in batches (BatchEnrollStudents); safe to run again after a crash",
    )
    sub.add_argument("file", help="the CSV file")
    sub.add_argument(
        "--dry-run", action="store_true", help="check the file and the names in it; apply nothing"
    )
    sub.add_argument(
        "--rejects",
        metavar="PATH",
        help="where the failing rows go, with their reasons (default FILE.rejects.csv)",
    )
    sub.add_argument(
        "--batch-size", type=int, default=bulk.BATCH, metavar="N", help="rows per call (1-1000)"
    )
    sub.add_argument(
        "--waitlist", action="store_true", help="join a full course's waitlist instead"
    )

    sub = add("export", _export, "write enrollments as CSV to stdout (ListEnrollments)")
    sub.add_argument("--course", type=int64, default=0, metavar="N", help="only course N's")
    return parser


@dataclass
class Finished:
    """A subcommand that wrote its own output; the exit status."""

    status: int


def _import(client: EnrollmentClient, args: argparse.Namespace) -> Finished:
    try:
        with open(args.file, "rb") as file:
            data = file.read()
    except OSError as exc:
        print(f"enrollment-client: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return Finished(2)
    try:
        summary = bulk.import_file(
            client,
            data,
            batch_size=args.batch_size,
            dry_run=args.dry_run,
            waitlist_if_full=args.waitlist,
            progress=bulk.progress_bar,
        )
    except (bulk.ImportFileError, ValueError) as exc:
        print(f"enrollment-client: {args.file}: {exc}", file=sys.stderr)
        return Finished(2)
    path = args.rejects or f"{args.file}.rejects.csv"
    if summary.rejects:
        with open(path, "w", encoding="utf-8", newline="") as out:
            bulk.write_rejects(out, summary)
    print(summary.text(path))
    return Finished(1 if summary.rejects else 0)


def _export(client: EnrollmentClient, args: argparse.Namespace) -> Finished:
    bulk.export(client, sys.stdout, course_id=args.course)
    return Finished(0)


# Rendering.


def _to_json(message: Message) -> dict:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def _time(ts: Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    return ts.ToDatetime().strftime("%Y-%m-%dT%H:%M:%SZ")


def _state(state: int) -> str:
    return pb.EnrollmentState.Name(state).removeprefix("ENROLLMENT_STATE_").lower()


def _capacity(capacity: int) -> str:
    return "unlimited" if capacity == 0 else str(capacity)


def _pairs(message: Message) -> list[tuple[str, str]]:
    if isinstance(message, pb.Student):
        return [
            ("id", str(message.id)),
            ("name", message.name),
            ("email", message.email),
            ("create_time", _time(message.create_time)),
        ]
    if isinstance(message, pb.Course):
        return [
            ("id", str(message.id)),
            ("code", message.code),
            ("title", message.title),
            ("capacity", str(message.capacity) if message.capacity else "0 (unlimited)"),
            ("enrolled_count", str(message.enrolled_count)),
            ("create_time", _time(message.create_time)),
        ]
    if isinstance(message, pb.Enrollment):
        return [
            ("student_id", str(message.student_id)),
            ("course_id", str(message.course_id)),
            ("enroll_time", _time(message.enroll_time)),
            ("state", _state(message.state)),
            ("waitlist_position", str(message.waitlist_position)),
        ]
    raise TypeError(f"no readable form for {type(message).__name__}")


# (header, value of a row, right-aligned) per column.
_COLUMNS: dict[str, list[tuple[str, Callable[[Message], str], bool]]] = {
    "students": [
        ("ID", lambda s: str(s.id), True),
        ("NAME", lambda s: s.name, False),
        ("EMAIL", lambda s: s.email, False),
        ("CREATED", lambda s: _time(s.create_time), False),
    ],
    "courses": [
        ("ID", lambda c: str(c.id), True),
        ("CODE", lambda c: c.code, False),
        ("TITLE", lambda c: c.title, False),
        ("CAPACITY", lambda c: _capacity(c.capacity), True),
        ("ENROLLED", lambda c: str(c.enrolled_count), True),
        ("CREATED", lambda c: _time(c.create_time), False),
    ],
    "enrollments": [
        ("COURSE", lambda e: str(e.course_id), True),
        ("STUDENT", lambda e: str(e.student_id), True),
        ("STATE", lambda e: _state(e.state), False),
        ("POSITION", lambda e: str(e.waitlist_position or "-"), True),
        ("ENROLLED", lambda e: _time(e.enroll_time), False),
    ],
}


def _table(noun: str, items: Sequence[Message]) -> list[str]:
    columns = _COLUMNS[noun]
    rows = [[header for header, _, _ in columns]]
    rows += [[value(item) for _, value, _ in columns] for item in items]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, (_, _, right) in zip(row, widths, columns, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def render(result: Item | Listing | Done, *, as_json: bool) -> str:
    if as_json:
        message = result.response if isinstance(result, Listing) else result.message
        return json.dumps(_to_json(message), indent=2, ensure_ascii=False)
    if isinstance(result, Item):
        return "\n".join(f"{key}: {value}" for key, value in _pairs(result.message))
    if isinstance(result, Done):
        return result.text
    lines = _table(result.noun, result.items) if result.items else [f"no {result.noun}"]
    if result.next_page_token:
        lines.append(f"next page: {result.next_page_token}")
    return "\n".join(lines)


def render_error(error: ClientError, *, as_json: bool) -> str:
    if as_json:
        body = {
            "code": error.code,
            "reason": error.reason,
            "message": error.message,
            "fields": error.fields,
        }
        return json.dumps({"error": body}, indent=2, ensure_ascii=False)
    return "\n".join([f"error: {error}"] + [f"  field: {name}" for name in error.fields])


def _connect(args: argparse.Namespace) -> EnrollmentClient:
    try:
        return EnrollmentClient(
            args.address,
            timeout=args.timeout,
            token=args.token,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        )
    except (OSError, ValueError) as exc:
        # A missing PEM file or a lone --tls-cert is a usage error, before any call.
        print(f"enrollment-client: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        client = _connect(args)
        with client:
            result = args.run(client, args)
        if isinstance(result, Finished):
            return result.status
        print(render(result, as_json=args.json))
    except ClientError as error:
        if args.json:
            print(render_error(error, as_json=True))
        else:
            print(render_error(error, as_json=False), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (head, less) went away; point stdout at devnull so the flush at exit
        # does not raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 0
