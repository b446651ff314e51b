"""Bearer-token authentication and roles, from a file of `<sha256 hex> <role> <name>` lines."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from enrollment.server.errors import (
    AuthFailuresLimited,
    MissingToken,
    PermissionDenied,
    Unauthenticated,
)

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


def reads_only(method: str) -> bool:
    """Get*/List* and WatchEvents; every other method of the service may write."""
    return method.startswith(("Get", "List")) or method == "WatchEvents"


def required_role(method: str) -> str:
    """reader for Get*/List* (GetEnrollment, ListEnrollments and ListEvents too) and
    WatchEvents, writer for EnrollStudent/DropCourse and their batches, admin for the
    rest (UpdateStudent and UpdateCourse too)."""
    if reads_only(method):
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


def peer_host(peer: str) -> str:
    """The caller's address without its port: 'ipv4:10.0.0.7:51234' -> 'ipv4:10.0.0.7'."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rsplit(":", 1)[0]
    return peer


class FailureBuckets:
    """A token bucket of failed authentications per peer address.

    Each address may fail `burst` times at once, then once per 1/`per_second` seconds;
    while its bucket is empty its calls are refused at once, without looking at their
    token, so guessing is held to that rate. Nothing sleeps: a refused call costs its
    caller a round trip and no other caller a thread. At most `max_peers` addresses are
    remembered (refilled buckets are forgotten first, then the oldest).
    """

    def __init__(
        self,
        burst: int = 20,
        per_second: float = 2.0,
        max_peers: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst, self.per_second, self.max_peers = burst, per_second, max_peers
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # host -> (tokens, at)

    def _level(self, host: str, now: float) -> float:
        tokens, at = self._buckets.get(host, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.per_second)

    def retry_after(self, host: str) -> float:
        """0 when host may try now; else seconds until its next try."""
        if host not in self._buckets:  # the common case: no failures, no lock
            return 0.0
        with self._lock:
            level = self._level(host, self._clock())
        return 0.0 if level >= 1 else (1 - level) / self.per_second

    def failed(self, host: str) -> None:
        with self._lock:
            now = self._clock()
            level = self._level(host, now)
            if host not in self._buckets and len(self._buckets) >= self.max_peers:
                self._forget(now)
            self._buckets[host] = (max(0.0, level - 1), now)

    def _forget(self, now: float) -> None:
        full = [h for h in self._buckets if self._level(h, now) >= self.burst]
        for host in full or [next(iter(self._buckets))]:
            del self._buckets[host]


class Authenticator:
    """Checks a call's authorization metadata against the configured tokens."""

    def __init__(self, tokens: tuple[Token, ...], buckets: FailureBuckets | None = None) -> None:
        self._tokens = tokens
        self.buckets = buckets or FailureBuckets()
        # Told (peer host, reason) of every refused call: metrics count them.
        self.on_failure: Callable[[str, str], None] | None = None

    def authenticate_call(self, authorizations: Sequence[str], peer: str) -> Token:
        """The token of a call's `authorization` metadata (all its values), from peer.

        More than one value is refused (a proxy may have checked only the first); a peer
        that failed too often is refused without its token being looked at.
        """
        host = peer_host(peer)
        wait = self.buckets.retry_after(host)
        try:
            if wait > 0:
                raise AuthFailuresLimited.of(wait)
            if len(authorizations) > 1:
                raise Unauthenticated(
                    "the call has more than one 'authorization' metadata value; send one"
                )
            return self.authenticate(authorizations[0] if authorizations else None)
        except (Unauthenticated, AuthFailuresLimited) as error:
            if type(error) is Unauthenticated:  # a wrong token, not a missing one
                self.buckets.failed(host)
            if self.on_failure is not None:
                self.on_failure(host, error.reason)
            raise

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
