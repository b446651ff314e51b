"""The enrollment-client command: one subcommand per EnrollmentService RPC."""

from __future__ import annotations

import argparse
import codecs
import io
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

# grpc's core reads this once, when grpc is imported: without it a failed TLS handshake
# is also logged (at INFO, on stderr) before the command's own one-line error.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from google.protobuf import json_format  # noqa: E402
from google.protobuf.message import Message  # noqa: E402
from google.protobuf.timestamp_pb2 import Timestamp  # noqa: E402

from enrollment.client import bulk  # noqa: E402
from enrollment.client.api import (  # noqa: E402
    DEFAULT_TIMEOUT,
    MAX_TIMEOUT,
    TIMEOUT_RANGE,
    ClientError,
    EnrollmentClient,
    check_token,
    read_tls_files,
    tls_flag,
)
from enrollment.v1 import enrollment_pb2 as pb  # noqa: E402

DEFAULT_ADDRESS = "127.0.0.1:50051"

EPILOG = """\
output: readable by default ("key: value" lines for one item, a table for a list,
then "next page: TOKEN" when there are more). With --json: the item as a JSON
object, or for a list {"students"|"courses"|"enrollments": [...],
"nextPageToken": "..."}; delete-student and delete-course print {}, drop {} or
{"promoted": {...}}. JSON follows the protobuf JSON mapping, as grpcurl prints
it: lowerCamelCase names (enrolledCount, createTime), int64 values (ids) as
strings, timestamps as RFC 3339 strings, and every field present, zero values
included.

errors: exit status 1 and one line on stderr,
  error: CODE REASON: message
followed by "  field: NAME" for each offending request field (proto field names);
with --json the error goes to stdout as {"error": {"code", "reason", "message",
"fields"}}. When a connection fails in a way that looks like a TLS/plaintext
mismatch, the message says so in brackets. Usage errors exit with status 2; with
--json they go to stdout as {"error": {"code": "USAGE", "reason": "", "message",
"fields": [], "usage"}}; so do import's local failures (a file it cannot read,
a rejects path it cannot write), without "usage". import --json prints
{"rows", "accepted", "enrolled", "waitlisted", "rejected", "rejectsFile", "dryRun"}.

global options may also follow the subcommand."""

SUBCOMMAND_EPILOG = "Global options (see enrollment-client --help) may also follow the subcommand."


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


# gRPC target forms other than HOST:PORT, passed as given (gRPC's naming doc).
_TARGET_SCHEMES = re.compile(r"(dns|unix|unix-abstract|ipv4|ipv6|vsock):")
_GIVE = f"give HOST:PORT, e.g. {DEFAULT_ADDRESS}"


def address(text: str) -> str:
    """A server address: HOST:PORT with a port of 0-65535, or another gRPC target form
    (unix:/path, dns:///host:port), passed as given. grpc would dial 443 for a host
    without a port, take 99999 modulo 65536 and an empty port as 443: another server
    than the one named."""
    if _TARGET_SCHEMES.match(text):
        return text
    if not text:
        raise argparse.ArgumentTypeError(f"the address is empty: {_GIVE}")
    if "/" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is a URL: {_GIVE}")
    host, colon, port = text.rpartition(":")
    if not colon or not re.fullmatch(r"-?[0-9]*", port) or host.endswith(":"):
        raise argparse.ArgumentTypeError(f"{text!r} has no port: {_GIVE}")
    if not re.fullmatch(r"[0-9]{1,5}", port) or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"the port of {text!r} must be 0-65535")
    return text


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= MAX_TIMEOUT:  # NaN and infinity too
        raise argparse.ArgumentTypeError(f"must be {TIMEOUT_RANGE}")
    return value


def token(text: str) -> str:
    """A bearer token; the message about one never quotes it."""
    try:
        check_token(text, name="the token")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


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


# A subcommand: what it prints (None: it printed as it went), or Finished with an exit status.
Command = Callable[
    [EnrollmentClient, argparse.Namespace], "Item | Listing | Done | Finished | None"
]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are a JSON error object on stdout under --json."""

    def __init__(self, *args: Any, json_errors: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.json_errors = json_errors

    def error(self, message: str) -> NoReturn:
        if not self.json_errors:
            super().error(message)
        body = {
            "code": "USAGE",
            "reason": "",
            "message": " ".join(message.split()),
            "fields": [],
            "usage": " ".join(self.format_usage().split()),
        }
        print(_dumps({"error": body}, indent=2))
        self.exit(2)


def _global_options(parser: argparse.ArgumentParser, *, in_subcommand: bool) -> None:
    # In a subcommand the defaults are SUPPRESS, so an option given there overrides
    # the one given before the subcommand and an absent one leaves it alone; their help
    # is the top-level command's, not repeated in each subcommand's.
    def default(value: object) -> object:
        return argparse.SUPPRESS if in_subcommand else value

    def described(text: str) -> str:  # help text too
        return argparse.SUPPRESS if in_subcommand else text

    # --address and --token default to None, filled from the environment after the parse
    # (_from_environment): argparse would check a variable's value as the flag's and name
    # the flag in its message.
    parser.add_argument(
        "--address",
        metavar="HOST:PORT",
        type=address,
        default=default(None),
        help=described(f"server address (env ENROLLMENT_ADDRESS; default {DEFAULT_ADDRESS})"),
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=seconds,
        default=default(DEFAULT_TIMEOUT),
        help=described(f"deadline of each call, in seconds (default {DEFAULT_TIMEOUT:g})"),
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help=described("print results and errors (usage errors too) as JSON on stdout"),
    )
    parser.add_argument(
        "--token",
        type=token,
        default=default(None),
        help=described("bearer token sent with every call (env ENROLLMENT_TOKEN)"),
    )
    # No environment variables here: ENROLLMENT_TLS_CERT/KEY name the server's own files.
    for flag, text in (
        ("--tls-ca", "use TLS, trusting the CA (PEM) that signed the server's certificate"),
        ("--tls-cert", "client certificate (PEM) for mutual TLS; TLS on, system CAs by default"),
        ("--tls-key", "private key (PEM) of --tls-cert"),
    ):
        parser.add_argument(flag, metavar="PEM", default=default(None), help=described(text))


def _from_environment(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--address and --token from ENROLLMENT_ADDRESS and ENROLLMENT_TOKEN (empty: unset)
    where not given; a value that will not do is a usage error naming the variable."""
    try:
        if args.address is None:
            variable = "ENROLLMENT_ADDRESS"
            args.address = address(os.environ.get(variable) or DEFAULT_ADDRESS)
        if args.token is None:
            variable = "ENROLLMENT_TOKEN"
            args.token = token(os.environ.get(variable) or "") or None
    except argparse.ArgumentTypeError as exc:
        parser.error(f"environment variable {variable}: {exc}")


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


def build_parser(*, json_errors: bool = False) -> argparse.ArgumentParser:
    """The enrollment-client parser; json_errors: usage errors as JSON on stdout."""
    parser = _Parser(
        prog="enrollment-client",
        description="Call the enrollment.v1.EnrollmentService API.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        json_errors=json_errors,
    )
    _global_options(parser, in_subcommand=False)
    commands = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="SUBCOMMAND",
        parser_class=_Parser,
    )

    def add(name: str, run: Command, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=text,
            description=text,
            epilog=SUBCOMMAND_EPILOG,
            json_errors=json_errors,
        )
        _global_options(sub, in_subcommand=True)
        sub.set_defaults(run=run)
        return sub

    def student_id(sub: argparse.ArgumentParser, text: str = "the student's id") -> None:
        sub.add_argument("--id", type=int64, required=True, metavar="N", help=text)

    sub = add("create-student", _create_student, "create a student (CreateStudent)")
    sub.add_argument("--name", required=True, help="the student's full name")
    sub.add_argument("--email", required=True, help="the student's email, unique among students")

    student_id(add("student", _get_student, "show one student (GetStudent)"))

    sub = add("students", _list_students, "list students, or one course's roster (ListStudents)")
    sub.add_argument(
        "--course", type=int64, default=0, metavar="N", help="only students enrolled in course N"
    )
    _page_options(sub)

    sub = add("delete-student", _delete_student, "delete a student (DeleteStudent)")
    student_id(sub, "the id of the student to delete")
    sub.add_argument("--force", action="store_true", help="also drop the student's enrollments")

    sub = add("create-course", _create_course, "create a course (CreateCourse)")
    sub.add_argument("--code", required=True, help="unique code such as CS-101")
    sub.add_argument("--title", required=True, help="the course's title")
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
    sub.add_argument("--id", type=int64, required=True, metavar="N", help="the course's id")

    sub = add("courses", _list_courses, "list courses, or one student's courses (ListCourses)")
    sub.add_argument(
        "--student", type=int64, default=0, metavar="N", help="only courses student N is in"
    )
    _page_options(sub)

    sub = add("delete-course", _delete_course, "delete a course (DeleteCourse)")
    sub.add_argument(
        "--id", type=int64, required=True, metavar="N", help="the id of the course to delete"
    )
    sub.add_argument("--force", action="store_true", help="also remove its enrollments")

    def pair(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--student", type=int64, required=True, metavar="N", help="student id")
        sub.add_argument("--course", type=int64, required=True, metavar="N", help="course id")

    sub = add("enroll", _enroll, "enroll a student in a course (EnrollStudent)")
    pair(sub)
    sub.add_argument(
        "--waitlist", action="store_true", help="join the waitlist when the course is full"
    )

    pair(add("enrollment", _get_enrollment, "show one enrollment (GetEnrollment)"))

    sub = add("enrollments", _list_enrollments, "list enrollments (ListEnrollments)")
    sub.add_argument("--student", type=int64, default=0, metavar="N", help="only student N's")
    sub.add_argument("--course", type=int64, default=0, metavar="N", help="only course N's")
    states = sub.add_mutually_exclusive_group()
    states.add_argument(
        "--waitlisted", action="store_true", help="only waiting entries (with --course: in line)"
    )
    states.add_argument("--enrolled", action="store_true", help="only enrolled entries")
    _page_options(sub)

    pair(add("drop", _drop, "remove a student from a course (DropCourse)"))

    sub = add(
        "events",
        _events,
        "print the change feed, one line per event (ListEvents; WatchEvents with --follow)",
    )
    sub.add_argument(
        "--after", type=int64, default=0, metavar="N", help="events after sequence N (default 0)"
    )
    sub.add_argument("--student", type=int64, default=0, metavar="N", help="only student N's")
    sub.add_argument("--course", type=int64, default=0, metavar="N", help="only course N's")
    sub.add_argument(
        "--follow",
        action="store_true",
        help="keep printing new events as they commit (resumes by itself after a restart)",
    )

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


def _events(client: EnrollmentClient, args: argparse.Namespace) -> None:
    """Prints as it goes (JSON lines with --json), flushing each line for a pipe."""

    def on_outage(error: ClientError | None) -> None:
        # On stderr, once an outage: a follow that retries in silence looks like a quiet feed.
        if error is None:
            said = f"reached the server at {client.address}, following"
        else:
            said = f"cannot reach the server at {client.address}, retrying: {error}"
        print(f"enrollment-client: {said}", file=sys.stderr, flush=True)

    for event in client.iter_events(
        args.after,
        student_id=args.student,
        course_id=args.course,
        follow=args.follow,
        on_outage=on_outage,
    ):
        line = _dumps(_to_json(event), separators=(",", ":")) if args.json else event_line(event)
        print(line, flush=True)


def event_line(event: pb.Event) -> str:
    kind = pb.EventType.Name(event.type).removeprefix("EVENT_TYPE_")
    parts = [str(event.sequence), _time(event.event_time), kind]
    if event.student_id:
        parts.append(f"student={event.student_id}")
    if event.course_id:
        parts.append(f"course={event.course_id}")
    if event.HasField("enrollment"):
        state = pb.EnrollmentState.Name(event.enrollment.state).removeprefix("ENROLLMENT_STATE_")
        parts.append(f"state={state}")
        if event.enrollment.waitlist_position:
            parts.append(f"position={event.enrollment.waitlist_position}")
    if event.actor:
        parts.append(f"actor={event.actor}")
    return " ".join(parts)


@dataclass
class Finished:
    """A subcommand that wrote its own output; the exit status."""

    status: int


def _import(client: EnrollmentClient, args: argparse.Namespace) -> Finished:
    try:
        with open(args.file, "rb") as file:
            data = file.read()
    except OSError as exc:
        return _local_failure(args, f"cannot read {args.file}: {exc.strerror}")
    path = args.rejects or f"{args.file}.rejects.csv"
    # Found before anything is sent, not after the batches committed.
    unwritable = _unwritable(path)
    if unwritable:
        return _local_failure(
            args, f"cannot write the rejects to {path}: {unwritable} (--rejects PATH)"
        )
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
        return _local_failure(args, f"{args.file}: {exc}")
    written: str | None = path
    if not summary.rejects:
        bulk.remove_old_rejects(path)
    else:
        try:
            with open(path, "w", encoding="utf-8", newline="") as out:
                bulk.write_rejects(out, summary)
        except OSError as exc:
            # The rows are applied: the summary still goes to stdout, the failure to stderr.
            written = None
            print(
                f"enrollment-client: cannot write the rejects to {path}: {exc.strerror}",
                file=sys.stderr,
            )
    if args.json:
        print(_dumps(summary.as_json(written), indent=2))
    else:
        print(summary.text(written))
    return Finished(1 if summary.rejects else 0)


def _unwritable(path: str) -> str:
    """Why a file cannot be written at path, as far as can be told without writing it; ""."""
    # A trailing "/" names a folder: open() refuses it even where none exists yet.
    if path.endswith(os.sep) or os.path.isdir(path):
        return "is a folder"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        return "its folder is missing or not writable"
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return "it is not writable"
    return ""


def _local_failure(args: argparse.Namespace, message: str) -> Finished:
    """A failure before any call (a file, an option): exit 2 and one line on stderr, or
    with --json the usage error object on stdout."""
    if args.json:
        body = {"code": "USAGE", "reason": "", "message": message, "fields": []}
        print(_dumps({"error": body}, indent=2))
    else:
        print(f"enrollment-client: {message}", file=sys.stderr)
    return Finished(2)


def _export(client: EnrollmentClient, args: argparse.Namespace) -> Finished:
    bulk.export(client, sys.stdout, course_id=args.course)
    return Finished(0)


# Rendering.


def _dumps(value: object, **options: Any) -> str:
    """JSON for stdout: characters as they are where stdout takes every character, else
    \\u escapes, so that the backslashreplace of main() never makes it invalid JSON."""
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    whole = codecs.lookup(encoding).name.startswith(("utf-8", "utf-16", "utf-32"))
    return json.dumps(value, ensure_ascii=not whole, **options)


def _to_json(message: Message) -> dict[str, Any]:
    # protobuf's JSON mapping, as grpcurl prints it: lowerCamelCase names.
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def _time(ts: Timestamp) -> str:
    if not ts.seconds and not ts.nanos:
        return "-"
    return ts.ToDatetime().strftime("%Y-%m-%dT%H:%M:%SZ")


def _state(state: pb.EnrollmentState.ValueType) -> str:
    return pb.EnrollmentState.Name(state).removeprefix("ENROLLMENT_STATE_").lower()


def _limit(value: int, zero: str) -> str:
    """A capacity: its number, or what 0 means for it ("unlimited" seats, "none" waiting)."""
    return zero if value == 0 else str(value)


@dataclass(frozen=True)
class Field:
    """One field of a readable item: "key: value" alone, a column (header) in a table."""

    key: str
    header: str
    value: Callable[[Any], str]
    right: bool = False  # right-aligned in a table
    in_table: bool = True  # a column of a list's table too, not only shown alone


# The one description of each message's readable form.
FIELDS: dict[type[Message], list[Field]] = {
    pb.Student: [
        Field("id", "ID", lambda s: str(s.id), right=True),
        Field("name", "NAME", lambda s: s.name),
        Field("email", "EMAIL", lambda s: s.email),
        Field("create_time", "CREATED", lambda s: _time(s.create_time)),
        Field("update_time", "UPDATED", lambda s: _time(s.update_time), in_table=False),
        Field("etag", "ETAG", lambda s: s.etag, in_table=False),
    ],
    pb.Course: [
        Field("id", "ID", lambda c: str(c.id), right=True),
        Field("code", "CODE", lambda c: c.code),
        Field("title", "TITLE", lambda c: c.title),
        Field("capacity", "CAPACITY", lambda c: _limit(c.capacity, "unlimited"), right=True),
        Field("enrolled_count", "ENROLLED", lambda c: str(c.enrolled_count), right=True),
        Field("waitlist_capacity", "WAITLIST", lambda c: _limit(c.waitlist_capacity, "none"), True),
        Field("waitlisted_count", "WAITING", lambda c: str(c.waitlisted_count), right=True),
        Field("create_time", "CREATED", lambda c: _time(c.create_time)),
        Field("update_time", "UPDATED", lambda c: _time(c.update_time), in_table=False),
        Field("etag", "ETAG", lambda c: c.etag, in_table=False),
    ],
    pb.Enrollment: [
        Field("course_id", "COURSE", lambda e: str(e.course_id), right=True),
        Field("student_id", "STUDENT", lambda e: str(e.student_id), right=True),
        Field("state", "STATE", lambda e: _state(e.state)),
        Field("waitlist_position", "POSITION", lambda e: str(e.waitlist_position or "-"), True),
        Field("enroll_time", "ENROLLED", lambda e: _time(e.enroll_time)),
        Field("create_time", "SINCE", lambda e: _time(e.create_time), in_table=False),
    ],
}


def _fields(message: Message) -> list[Field]:
    try:
        return FIELDS[type(message)]
    except KeyError:
        raise TypeError(f"no readable form for {type(message).__name__}") from None


def _pairs(message: Message) -> list[tuple[str, str]]:
    return [(field.key, field.value(message)) for field in _fields(message)]


def _table(items: Sequence[Message]) -> list[str]:
    columns = [field for field in _fields(items[0]) if field.in_table]
    rows = [[column.header for column in columns]]
    rows += [[column.value(item) for column in columns] for item in items]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = []
    for row in rows:
        cells = [
            cell.rjust(width) if column.right else cell.ljust(width)
            for cell, width, column in zip(row, widths, columns, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return lines


def render(result: Item | Listing | Done, *, as_json: bool) -> str:
    if as_json:
        message = result.response if isinstance(result, Listing) else result.message
        return _dumps(_to_json(message), indent=2)
    if isinstance(result, Item):
        return "\n".join(f"{key}: {value}" for key, value in _pairs(result.message))
    if isinstance(result, Done):
        return result.text
    lines = _table(result.items) if result.items else [f"no {result.noun}"]
    if result.next_page_token:
        lines.append(f"next page: {result.next_page_token}")
    return "\n".join(lines)


def render_error(error: ClientError, *, as_json: bool) -> str:
    if as_json:
        body = {
            "code": error.code,
            "reason": error.reason,
            "message": error.explained,
            "fields": error.fields,
        }
        return _dumps({"error": body}, indent=2)
    return "\n".join([f"error: {error}"] + [f"  field: {name}" for name in error.fields])


def _connect(args: argparse.Namespace) -> EnrollmentClient:
    # Checked here too, so that a message names the flag rather than the parameter.
    read_tls_files(args.tls_ca, args.tls_cert, args.tls_key, spelled=tls_flag)
    return EnrollmentClient(
        args.address,
        timeout=args.timeout,
        token=args.token,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )


def _escape_what_cannot_be_encoded() -> None:
    # Output the terminal's encoding cannot take (PYTHONIOENCODING=ascii, a C locale) is
    # written escaped: a result raising UnicodeEncodeError after the call succeeded made
    # a write look like a crash.
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")


def main(argv: Sequence[str] | None = None) -> int:
    _escape_what_cannot_be_encoded()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Before the parse: a usage error is reported as JSON when --json is anywhere.
    parser = build_parser(json_errors="--json" in argv)
    args = parser.parse_args(argv)
    _from_environment(parser, args)
    try:
        try:
            client = _connect(args)
        except ValueError as exc:
            # An unusable PEM file or a lone --tls-cert is a usage error, before any call.
            parser.error(str(exc))
        with client:
            result = args.run(client, args)
        if isinstance(result, Finished):
            return result.status
        if result is not None:  # events prints its own lines as they come
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
