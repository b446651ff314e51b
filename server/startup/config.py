"""The server's configuration: each serve setting declared once, checked in one pass."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from enrollment.server import addresses
from enrollment.server.operations.logs import LOG_FORMATS
from enrollment.server.persistence.engine import scheme_kind


class StartupError(RuntimeError):
    """The server cannot start; the message says why and what fixes it."""


# On PostgreSQL, the connections the event loop answers the cheap reads on, beside the
# serving threads' (persistence/loop_reads.py). A read holds one only while its
# statement is at the database (one thread cannot keep many busy).
LOOP_READ_CONNECTIONS = 2


@dataclass(frozen=True)
class Kind:
    """How a setting's text (flag or environment variable) becomes its value.

    convert raises ValueError for text that is not of the kind; `problem` names the
    values the kind refuses ("1 or more"), also for values set in code.
    """

    word: str  # what the text must be: "a whole number"
    convert: Callable[[str], Any]
    bound: str = ""
    allowed: Callable[[Any], bool] = lambda value: True

    def problem(self, value: Any) -> str | None:
        if value is None or self.allowed(value):
            return None
        return self.bound

    def parse(self, text: str) -> Any:
        """text's value; ValueError("must be <word or bound>, not 'text'") otherwise."""
        try:
            value = self.convert(text.strip())
        except ValueError:
            raise ValueError(f"must be {self.word}, not {text!r}") from None
        bound = self.problem(value)
        if bound:
            raise ValueError(f"must be {bound}, not {text!r}")
        return value


# grpc takes its whole-number settings as C ints: a larger one crashed the start-up.
INT32_MAX = 2**31 - 1
# Calls and watchers at once, each: grpc's limit of calls is their sum (startup/server.py).
MAX_AT_ONCE = 1_000_000


def whole(minimum: int, maximum: int = INT32_MAX) -> Kind:
    return Kind(
        "a whole number",
        int,
        f"{minimum} to {maximum}",
        lambda value: minimum <= value <= maximum,
    )


def _seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


# The longest wait a setting may name: grpc and the databases take them as int32
# milliseconds (2**31 - 1 ms, about 24.8 days); a longer one crashed the start-up.
MAX_SECONDS = 2_147_483


def seconds(*, above_zero: bool) -> Kind:
    if above_zero:
        return Kind(
            "a number of seconds",
            _seconds,
            f"above 0 and at most {MAX_SECONDS} (about 24 days)",
            lambda value: 0 < value <= MAX_SECONDS,
        )
    return Kind(
        "a number of seconds",
        _seconds,
        f"0 to {MAX_SECONDS} (about 24 days)",
        lambda value: 0 <= value <= MAX_SECONDS,
    )


def one_of(*choices: str) -> Kind:
    def convert(text: str) -> str:
        if text not in choices:
            raise ValueError(text)
        return text

    return Kind(f"one of {', '.join(choices)}", convert)


TEXT = Kind("text", str)
ADDRESS = Kind(
    "HOST:PORT",
    str,
    "HOST:PORT with a host and a port of 0-65535 ([::1]:50051 for IPv6)",
    addresses.well_formed,
)

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'30d', '12h', '90m', '45s' or plain seconds; above 0."""
    found = _DURATION.fullmatch(text.strip().lower())
    if not found or float(found[1]) <= 0:
        raise ValueError(f"{text!r} is not a duration above 0 such as 30d, 12h, 90m or 3600")
    return float(found[1]) * _UNIT[found[2]]


# The API promises a replay of a request_id for at least a day (the contract, AIP-155);
# a shorter --request-id-retention is served, with a warning at start-up.
PROMISED_REQUEST_ID_RETENTION = 24 * 3600.0

# The purgers' cutoff (now minus the retention) must stay a date.
MAX_RETENTION = 36500 * 86400.0
DURATION = Kind(
    "a duration such as 30d, 12h, 90m or 3600 (seconds)",
    parse_duration,
    "above 0 and at most 36500d (100 years)",
    lambda value: 0 < value <= MAX_RETENTION,
)
RATE = Kind("a number", _seconds, "above 0", lambda value: value > 0)


def _switch(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


# A flag without a value (--log-sql-values), or its variable set to 1 or 0.
SWITCH = Kind("1 or 0", _switch)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True)
class Setting:
    """One serve setting: flag --NAME-WITH-DASHES and environment variable ENROLLMENT_NAME
    (from `flag` when the field's name differs); a flag wins over its variable."""

    name: str
    kind: Kind
    help: str
    metavar: str
    flag: str
    default_text: str | None = None  # for help, when the default is not a plain value
    deprecated_flags: tuple[str, ...] = ()

    @property
    def env(self) -> str:
        return "ENROLLMENT_" + self.flag.removeprefix("--").replace("-", "_").upper()

    @property
    def default(self) -> Any:
        return ServerConfig.__dataclass_fields__[self.name].default

    def source(
        self, flags: Mapping[str, str | None], environ: Mapping[str, str]
    ) -> tuple[str, str] | None:
        """(label, text) of where the value comes from, or None for the default."""
        for flag in (self.flag, *self.deprecated_flags):
            given = flags.get(flag)
            if given is not None:
                return flag, given
        # An empty variable counts as unset (compose files write VAR: ${VAR:-}).
        if environ.get(self.env):
            return self.env, environ[self.env]
        return None


def setting(
    default: Any,
    kind: Kind,
    help: str,  # noqa: A002 - argparse's word
    *,
    metavar: str = "",
    flag: str = "",
    default_text: str | None = None,
    deprecated_flags: tuple[str, ...] = (),
) -> Any:
    """A ServerConfig field that is also a serve flag and an environment variable."""
    options = {
        "kind": kind,
        "help": help,
        "metavar": metavar,
        "flag": flag,
        "default_text": default_text,
        "deprecated_flags": deprecated_flags,
    }
    return field(default=default, metadata={"setting": options})


@dataclass(frozen=True)
class ServerConfig:
    address: str = setting(
        "127.0.0.1:50051", ADDRESS, "HOST:PORT to listen on; a port in use is refused",
        metavar="HOST:PORT",
    )  # fmt: skip
    database_url: str = setting(
        "sqlite:///enrollment.db", TEXT, "database URL (sqlite:///, postgresql://, mysql://)",
        metavar="URL",
    )  # fmt: skip
    grace_seconds: float = setting(
        10.0, seconds(above_zero=False),
        "seconds in-flight calls get to finish on SIGTERM/SIGINT", metavar="S", flag="--grace",
    )  # fmt: skip
    # Threads share one GIL: past a few, each SQLite call's GIL hand-off costs more CPU
    # than the extra thread gains (figures: bench/PROFILE.md, "Figures behind code
    # comments"). More cores: serve more processes.
    threads: int = setting(
        4, whole(1, 1024), "threads serving calls at once, per process; more calls wait in line, "
        "up to --max-concurrent-rpcs", metavar="N", deprecated_flags=("--max-workers",),
    )  # fmt: skip
    database_timeout: float = setting(
        5.0, seconds(above_zero=True),
        "seconds a call waits for a lock or a new connection, and a statement may run, "
        "before the call fails as UNAVAILABLE", metavar="S",
    )  # fmt: skip
    pool_size: int | None = setting(
        None, whole(1), "database connections per process; at least --threads",
        metavar="N", default_text="as many as --threads; on PostgreSQL, 2 more",
    )  # fmt: skip
    pool_timeout: float = setting(
        5.0, seconds(above_zero=True),
        "seconds a call waits for a free pooled connection before it fails as UNAVAILABLE",
        metavar="S",
    )  # fmt: skip
    workers: int = setting(
        1, whole(1, 256), "server processes sharing the port (SO_REUSEPORT)", metavar="N"
    )
    # Security, limits and operations (see README "Security" and "Operations").
    tls_cert: str | None = setting(
        None, TEXT, "serve TLS with this certificate chain", metavar="PEM", default_text="off"
    )
    tls_key: str | None = setting(
        None, TEXT, "the private key of --tls-cert", metavar="PEM", default_text="off"
    )
    tls_client_ca: str | None = setting(
        None, TEXT, "require client certificates signed by this CA: mutual TLS",
        metavar="PEM", default_text="off",
    )  # fmt: skip
    auth_tokens: str | None = setting(
        None, TEXT, "require bearer tokens listed in FILE, lines '<sha256 hex> <role> <name>'",
        metavar="FILE", default_text="off",
    )  # fmt: skip
    # Wrong tokens one peer address may send at once, then per second (a token bucket);
    # beyond it the address's calls are RESOURCE_EXHAUSTED until its bucket refills.
    auth_failure_burst: int = setting(
        20, whole(1), "wrong tokens one address may send at once before its calls are refused "
        "(RESOURCE_EXHAUSTED AUTH_FAILURES_LIMITED)", metavar="N",
    )  # fmt: skip
    auth_failure_rate: float = setting(
        2.0, RATE, "wrong tokens per second one address may send after the burst", metavar="R"
    )
    max_message_bytes: int = setting(
        64 * 1024, whole(1024),
        "largest request message accepted, once decompressed; larger ones are "
        "RESOURCE_EXHAUSTED REQUEST_TOO_LARGE, and grpc refuses those over twice N itself",
        metavar="N",
    )  # fmt: skip
    max_concurrent_rpcs: int = setting(
        1000, whole(1, MAX_AT_ONCE),
        "calls accepted at once, queued beyond --threads; more are RESOURCE_EXHAUSTED "
        "(WatchEvents streams are not counted: --max-watchers bounds them)",
        metavar="N",
    )  # fmt: skip
    keepalive_time: float = setting(
        60.0, seconds(above_zero=True), "ping idle connections this often", metavar="S"
    )
    keepalive_timeout: float = setting(
        20.0, seconds(above_zero=True),
        "close a connection whose ping is not answered in S", metavar="S",
    )  # fmt: skip
    keepalive_min_ping_interval: float = setting(
        10.0, seconds(above_zero=False),
        "clients pinging more often are disconnected", metavar="S",
    )  # fmt: skip
    max_connection_age: float = setting(
        1800.0, seconds(above_zero=False),
        "close connections after S seconds, so clients rebalance; 0 = never", metavar="S",
    )  # fmt: skip
    max_connection_age_grace: float = setting(
        30.0, seconds(above_zero=False),
        "time in-flight calls get on such a connection", metavar="S",
    )  # fmt: skip
    # What one client can hold (README "Operations").
    request_timeout: float = setting(
        5.0, seconds(above_zero=True), "end a call whose request message has not arrived S "
        "seconds after the call began (DEADLINE_EXCEEDED, reason REQUEST_TIMEOUT)", metavar="S",
    )  # fmt: skip
    max_streams_per_connection: int = setting(
        100, whole(1), "calls at once on one connection (HTTP/2 MAX_CONCURRENT_STREAMS); more "
        "wait in the client, and at the limit a few are refused UNAVAILABLE unrun", metavar="N",
    )  # fmt: skip
    handshake_timeout: float = setting(
        5.0, seconds(above_zero=True), "close a new connection that has not finished its TLS "
        "handshake and HTTP/2 preface within S seconds", metavar="S",
    )  # fmt: skip
    max_connection_idle: float = setting(
        300.0, seconds(above_zero=False),
        "close a connection that has had no call for S seconds; 0 = never", metavar="S",
    )  # fmt: skip
    max_connections: int | None = setting(
        None, whole(1), "connections at once; more are closed when accepted", metavar="N",
        default_text="ulimit -n - 64",
    )  # fmt: skip
    event_retention: float | None = setting(
        None, DURATION, "keep change-feed events this long, purging older ones in small "
        "batches", metavar="DURATION", default_text="forever",
    )  # fmt: skip
    request_id_retention: float = setting(
        PROMISED_REQUEST_ID_RETENTION, DURATION, "how long a successful call's request_id "
        "is remembered for safe retries (AIP-155 and the API promise at least a day; less "
        "is served with a warning)", metavar="DURATION", default_text="24h",
    )  # fmt: skip
    max_watchers: int = setting(
        1000, whole(0, MAX_AT_ONCE), "WatchEvents streams at once per server process; more "
        "are refused with TOO_MANY_WATCHERS (0 turns WatchEvents off: every stream is refused)",
        metavar="N",
    )  # fmt: skip
    max_open_streams: int = setting(
        100, whole(1, MAX_AT_ONCE), "health Watch and reflection streams at once per server "
        "process, apart from --max-concurrent-rpcs (they need no token, so they cannot take "
        "the calls' room); more are refused with RESOURCE_EXHAUSTED", metavar="N",
    )  # fmt: skip
    watch_poll_interval: float = setting(
        0.25, seconds(above_zero=True), "seconds between a server process's looks for "
        "change-feed events committed by other processes (the fallback: PostgreSQL's "
        "LISTEN/NOTIFY wakes it at once, and on SQLite and MariaDB a cheap look every "
        "20 or 50 ms does)", metavar="S",
    )  # fmt: skip
    watch_queue: int = setting(
        10_000, whole(1), "change-feed events held for one WatchEvents stream whose client "
        "does not read; beyond, the stream ends with WATCHER_TOO_SLOW", metavar="N",
    )  # fmt: skip
    metrics_address: str | None = setting(
        None, ADDRESS, "serve Prometheus metrics at http://HOST:PORT/metrics",
        metavar="HOST:PORT", default_text="off",
    )  # fmt: skip
    log_format: str = setting(
        "text", one_of(*LOG_FORMATS), "text lines or one JSON object per line",
        metavar="{" + ",".join(LOG_FORMATS) + "}",
    )  # fmt: skip
    # Every subcommand takes it, before or after the subcommand's name.
    log_level: str = setting(
        "INFO", one_of(*LOG_LEVELS), "log level", metavar="{" + ",".join(LOG_LEVELS) + "}"
    )
    # Every subcommand takes it too; a switch: the flag takes no value.
    log_sql_values: bool = setting(
        False, SWITCH, "with --log-level DEBUG, also log the values bound to each SQL "
        "statement (names, emails: personal data)", default_text="off",
    )  # fmt: skip

    # Not flags: set by tests and by the supervisor.
    # Seconds between the health probe's SELECT 1.
    health_interval: float = 1.0
    # Set in worker processes: share the port with the other workers.
    reuse_port: bool = False
    # How each setting given was spelled, flag or variable, by field name (load() fills
    # it): errors found after loading, such as an unreadable TLS file, name it that way.
    given_as: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    def label(self, name: str) -> str:
        """The flag or variable the setting `name` was given by; its flag if neither."""
        return self.given_as.get(name) or BY_NAME[name].flag

    @property
    def connections(self) -> int:
        """Database connections per process: --pool-size; by default --threads and, on
        PostgreSQL, LOOP_READ_CONNECTIONS more, for the event loop's reads."""
        if self.pool_size is not None:
            return self.pool_size
        return self.threads + (LOOP_READ_CONNECTIONS if self._postgresql() else 0)

    @property
    def loop_read_connections(self) -> int:
        """Of connections, those the event loop answers PostgreSQL's one-statement reads
        on (persistence/loop_reads.py): LOOP_READ_CONNECTIONS, or what --pool-size leaves
        beyond --threads when that is fewer (0: those reads run in the pool's threads)."""
        if not self._postgresql():
            return 0
        return max(0, min(LOOP_READ_CONNECTIONS, self.connections - self.threads))

    def _postgresql(self) -> bool:
        return scheme_kind(self.database_url) == "postgresql"

    def check(self) -> None:
        """Raise StartupError naming every value no server can run with."""
        problems = _problems(self)
        if problems:
            raise StartupError("; ".join(problems))


def _settings() -> tuple[Setting, ...]:
    found = []
    for each in fields(ServerConfig):
        options = each.metadata.get("setting")
        if options is not None:
            flag = options["flag"] or "--" + each.name.replace("_", "-")
            found.append(Setting(name=each.name, **{**options, "flag": flag}))
    return tuple(found)


SETTINGS: tuple[Setting, ...] = _settings()
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def load(flags: Mapping[str, str | None], environ: Mapping[str, str]) -> ServerConfig:
    """The configuration from flags (text by flag, None when not given), then the
    environment, then the defaults; every problem in one StartupError."""
    values: dict[str, Any] = {}
    labels: dict[str, str] = {}
    problems, bad = [], set()
    for each in SETTINGS:
        given = _given(each, flags, environ)
        if given is None:
            continue
        labels[each.name], value, problem = given
        if problem:
            problems.append(problem)
            bad.add(each.name)
        else:
            values[each.name] = value
    config = ServerConfig(**values, given_as=labels)
    problems += _conflicts(config, bad)
    if problems:
        raise StartupError("; ".join(problems))
    return config


def read(name: str, flags: Mapping[str, str | None], environ: Mapping[str, str]) -> Any:
    """One setting alone (a subcommand other than serve takes only a few)."""
    each = BY_NAME[name]
    given = _given(each, flags, environ)
    if given is None:
        return each.default
    _, value, problem = given
    if problem:
        raise StartupError(problem)
    return value


def _given(
    each: Setting, flags: Mapping[str, str | None], environ: Mapping[str, str]
) -> tuple[str, Any, str] | None:
    """(where from, value, problem or "") of a setting given by flag or variable."""
    found = each.source(flags, environ)
    if found is None:
        return None
    label, text = found
    try:
        return label, each.kind.parse(text), ""
    except ValueError as exc:
        return label, None, f"{label} {exc}"


def _problems(config: ServerConfig) -> list[str]:
    """For a ServerConfig made in code: values out of range, then conflicts."""
    problems, bad = [], set()
    for each in SETTINGS:
        value = getattr(config, each.name)
        bound = each.kind.problem(value)
        if bound:
            problems.append(f"{each.flag} must be {bound}, not {value}")
            bad.add(each.name)
    return problems + _conflicts(config, bad)


def _conflicts(config: ServerConfig, bad: set[str]) -> list[str]:
    """Settings that contradict each other, named as given (flag or variable); those
    already found bad are left out."""

    label = config.label
    problems = []
    if config.health_interval <= 0:
        problems.append("the health interval must be above 0")
    if (
        config.pool_size is not None
        and not {"pool_size", "threads"} & bad
        and config.pool_size < config.threads
    ):
        problems.append(
            f"{label('pool_size')} {config.pool_size} is below {label('threads')} "
            f"{config.threads}: every serving thread needs a connection"
        )
    if bool(config.tls_cert) != bool(config.tls_key):
        given, missing = ("tls_cert", "tls_key") if config.tls_cert else ("tls_key", "tls_cert")
        # The one missing spelled as the one given was: both variables, or both flags.
        spelled = BY_NAME[missing].env if label(given).startswith("ENROLLMENT_") else None
        problems.append(f"{label(given)} and {spelled or label(missing)} go together")
    if config.tls_client_ca and not config.tls_cert and not config.tls_key:
        via_env = label("tls_client_ca").startswith("ENROLLMENT_")
        cert, key = (BY_NAME[n].env if via_env else label(n) for n in ("tls_cert", "tls_key"))
        problems.append(
            f"{label('tls_client_ca')} turns on mutual TLS, which needs TLS: give {cert} "
            f"and {key} too"
        )
    if config.metrics_address and config.workers > 1 and not {"metrics_address", "workers"} & bad:
        _, port = addresses.split(config.metrics_address)
        last = int(port) + config.workers - 1 if port.isdigit() and int(port) else 0
        if last > 65535:
            problems.append(
                f"{label('metrics_address')} {config.metrics_address} with {label('workers')} "
                f"{config.workers} needs ports {port} to {last} (one per worker), past 65535"
            )
    return problems
