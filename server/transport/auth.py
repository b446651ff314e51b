"""Bearer-token authentication and roles, from a file of `<sha256 hex> <role> <name>` lines."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from enrollment.server.errors import MissingToken, PermissionDenied, Unauthenticated

ROLES = ("reader", "writer", "admin")
_RANK = {role: rank for rank, role in enumerate(ROLES)}

# The role each EnrollmentService method needs; a method not listed needs admin.
_WRITER_METHODS = frozenset(
    {"EnrollStudent", "DropCourse", "BatchEnrollStudents", "BatchDropCourses"}
)

_HASH = re.compile(r"[0-9a-f]{64}")
_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")


class TokenFileError(ValueError):
    """The tokens file cannot be used; the message names the file and line, never a hash."""


@dataclass(frozen=True)
class Token:
    digest: bytes  # sha256 of the token, raw
    role: str
    name: str


def required_role(method: str) -> str:
    """reader for Get*/List* (GetEnrollment and ListEnrollments too), writer for
    EnrollStudent/DropCourse and their batches, admin for the rest (UpdateStudent and
    UpdateCourse too)."""
    if method.startswith(("Get", "List")):
        return "reader"
    if method in _WRITER_METHODS:
        return "writer"
    return "admin"


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token_line(role: str, name: str) -> tuple[str, str]:
    """A new random token and its tokens-file line."""
    if role not in _RANK:
        raise TokenFileError(f"role must be one of {', '.join(ROLES)}")
    if not _NAME.fullmatch(name):
        raise TokenFileError("name must be 1-64 characters of A-Z a-z 0-9 . _ @ -")
    token = secrets.token_urlsafe(32)
    return token, f"{hash_token(token)} {role} {name}"


def load_tokens(path: str) -> tuple[Token, ...]:
    """Parse the tokens file; any malformed line refuses the whole file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read the tokens file {path!r}: {exc}") from exc
    tokens: list[Token] = []
    names: set[str] = set()
    digests: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"tokens file {path!r} line {number}"
        fields = line.split()
        if len(fields) != 3:
            raise TokenFileError(f"{where}: expected '<sha256 hex> <role> <name>'")
        digest, role, name = fields
        digest = digest.lower()
        if not _HASH.fullmatch(digest):
            raise TokenFileError(f"{where}: the first field must be 64 hex digits (a sha256)")
        if role not in _RANK:
            raise TokenFileError(f"{where}: the role must be one of {', '.join(ROLES)}")
        if not _NAME.fullmatch(name):
            raise TokenFileError(f"{where}: the name must be 1-64 of A-Z a-z 0-9 . _ @ -")
        if name in names or digest in digests:
            raise TokenFileError(f"{where}: the same name or token appears twice")
        names.add(name)
        digests.add(digest)
        tokens.append(Token(bytes.fromhex(digest), role, name))
    if not tokens:
        raise TokenFileError(f"the tokens file {path!r} holds no tokens; nobody could call")
    return tuple(tokens)


class Authenticator:
    """Checks a call's authorization metadata against the configured tokens."""

    def __init__(self, tokens: tuple[Token, ...]) -> None:
        self._tokens = tokens

    @classmethod
    def from_file(cls, path: str) -> Authenticator:
        return cls(load_tokens(path))

    def authenticate(self, authorization: str | None) -> Token:
        """The token the header names; MissingToken or Unauthenticated otherwise."""
        if not authorization:
            raise MissingToken.of()
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise MissingToken.of()
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found = None
        # Compare against every token in constant time, with no early exit.
        for candidate in self._tokens:
            if hmac.compare_digest(candidate.digest, digest):
                found = candidate
        if found is None:
            raise Unauthenticated.of()
        return found

    @staticmethod
    def authorize(token: Token, method: str, needed: str) -> None:
        """PermissionDenied unless the token's role is enough for method."""
        if _RANK[token.role] < _RANK[needed]:
            raise PermissionDenied.of(method, token.role, needed)
