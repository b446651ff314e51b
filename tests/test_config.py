"""enrollment-server's configuration and command line: every serve setting from its flag or
its environment variable, bad values as one line and exit 2, help that says what each does."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess

import peewee as pw
import pytest

from enrollment.server.startup import cli
from enrollment.server.startup.config import SETTINGS, ServerConfig, StartupError, load
from tests.mounts import read_only_view
from tests.servers import SERVER

# The command line is the same whatever the database; one is enough.
pytestmark = pytest.mark.databases("sqlite")


def run(*args: str, env: dict[str, str] | None = None, timeout: float = 30):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ENROLLMENT_")}
    return subprocess.run(
        [SERVER, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**environment, **(env or {})},
    )


def one_line_exit_2(result: subprocess.CompletedProcess, *expected: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


# A serve that got past its configuration would wait for calls: every case below fails
# before that, so a hang is a failure too (the timeout).
BAD_VALUES = [
    ("workers", "abc", "a whole number"),
    ("workers", "0", "1 to 256"),
    ("workers", "1000", "1 to 256"),
    ("threads", "many", "a whole number"),
    # 22,000 threads started before the process gave up, with a traceback, and hung.
    ("threads", "100000", "1 to 1024"),
    ("grace", "soon", "a number of seconds"),
    ("database_timeout", "0", "above 0"),
    ("pool_size", "1.5", "a whole number"),
    ("max_message_bytes", "10", "1024 to 2147483647"),
    # grpc takes these as C ints: past 2**31 - 1 the start-up crashed (OverflowError).
    ("max_message_bytes", "2147483648", "1024 to 2147483647"),
    ("max_streams_per_connection", "2147483648", "1 to 2147483647"),
    ("max_connections", "2147483648", "1 to 2147483647"),
    ("max_concurrent_rpcs", "2147483648", "1 to 1000000"),
    ("max_watchers", "1000001", "0 to 1000000"),
    ("keepalive_time", "nan", "a number of seconds"),
    # grpc takes these as int32 milliseconds: 30 days crashed the start-up.
    ("keepalive_time", "2592000", "at most 2147483"),
    ("max_connection_age", "2592000", "0 to 2147483"),
    # Past what a date can hold: the server started, then crashed (OverflowError), or
    # its purgers failed with a traceback every minute.
    ("event_retention", "1000000000d", "at most 36500d (100 years)"),
    ("event_retention", "800000d", "at most 36500d (100 years)"),
    ("request_id_retention", "999999d", "at most 36500d (100 years)"),
    # grpc takes a port beyond 65535 modulo 65536, and an empty one as 443: it served
    # on another port than the one asked for.
    ("address", "127.0.0.1:99999", "a port of 0-65535"),
    ("address", "127.0.0.1:", "a port of 0-65535"),
    ("address", "127.0.0.1:-5", "a port of 0-65535"),
    ("address", "50051", "HOST:PORT with a host"),
    ("address", "http://127.0.0.1:50051", "HOST:PORT with a host"),
    ("metrics_address", "127.0.0.1:65536", "a port of 0-65535"),
    ("log_format", "xml", "text, json"),
    ("log_level", "LOUD", "DEBUG, INFO, WARNING, ERROR"),
]


@pytest.mark.parametrize(("name", "value", "expected"), BAD_VALUES)
def test_a_bad_environment_variable_fails_like_its_flag(tmp_path, name, value, expected):
    flag, variable = "--" + name.replace("_", "-"), "ENROLLMENT_" + name.upper()
    database = ["--database-url", f"sqlite:///{tmp_path / 'missing' / 'x.db'}"]
    from_flag = run("serve", *database, flag, value)
    from_env = run("serve", *database, env={variable: value})
    line = one_line_exit_2(from_flag, flag, expected, repr(value))
    assert one_line_exit_2(from_env, variable, expected, repr(value)) == line.replace(
        flag, variable
    )


def test_every_problem_is_named_in_one_line(tmp_path):
    result = run(
        "serve", "--grace", "-1", "--threads", "0",
        env={"ENROLLMENT_WORKERS": "x", "ENROLLMENT_POOL_SIZE": "2"},
    )  # fmt: skip
    line = one_line_exit_2(result, "--grace", "--threads", "ENROLLMENT_WORKERS")
    assert "Traceback" not in line


def test_every_serve_flag_has_an_environment_variable():
    serve = cli.build_parser()._subparsers._group_actions[0].choices["serve"]
    flags = {
        option
        for action in serve._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }
    deprecated = {old for setting in SETTINGS for old in setting.deprecated_flags}
    assert {setting.flag for setting in SETTINGS} == flags - deprecated
    help_text = serve.format_help()
    for setting in SETTINGS:
        assert f"env {setting.env}" in " ".join(help_text.split()), setting.flag


def test_each_variable_reaches_the_config_and_its_flag_wins():
    changed = {
        "address": ("0.0.0.0:6000", "0.0.0.0:6000"),
        "database_url": ("sqlite:///from-env.db", "sqlite:///from-env.db"),
        "grace_seconds": ("2.5", 2.5),
        "threads": ("8", 8),
        "database_timeout": ("7", 7.0),
        "pool_size": ("9", 9),
        "pool_timeout": ("3", 3.0),
        "workers": ("3", 3),
        "tls_cert": ("server.crt", "server.crt"),
        "tls_key": ("server.key", "server.key"),
        "tls_client_ca": ("ca.crt", "ca.crt"),
        "auth_tokens": ("tokens.txt", "tokens.txt"),
        "max_message_bytes": ("2048", 2048),
        "max_concurrent_rpcs": ("5", 5),
        "keepalive_time": ("61", 61.0),
        "keepalive_timeout": ("21", 21.0),
        "keepalive_min_ping_interval": ("11", 11.0),
        "max_connection_age": ("0", 0.0),
        "max_connection_age_grace": ("31", 31.0),
        "metrics_address": ("127.0.0.1:9464", "127.0.0.1:9464"),
        "log_format": ("json", "json"),
        "log_level": ("DEBUG", "DEBUG"),
        "log_sql_values": ("1", True),
        "auth_failure_burst": ("21", 21),
        "auth_failure_rate": ("3", 3.0),
        "request_timeout": ("6", 6.0),
        "max_streams_per_connection": ("101", 101),
        "handshake_timeout": ("6", 6.0),
        "max_connection_idle": ("301", 301.0),
        "max_connections": ("50", 50),
        "event_retention": ("12h", 43200.0),
        "max_watchers": ("7", 7),
        "max_open_streams": ("9", 9),
        "watch_poll_interval": ("0.5", 0.5),
        "watch_queue": ("99", 99),
        "request_id_retention": ("2d", 172800.0),
    }
    assert set(changed) == {setting.name for setting in SETTINGS}
    environ = {setting.env: changed[setting.name][0] for setting in SETTINGS}
    config = load({}, environ)
    for name, (_, value) in changed.items():
        assert getattr(config, name) == value, name
        assert value != getattr(ServerConfig(), name), f"{name}: pick a value that is no default"
    flags = {"--threads": "9", "--address": "127.0.0.1:7000"}
    config = load(flags, environ)
    assert (config.threads, config.address) == (9, "127.0.0.1:7000")
    assert load({}, {}) == ServerConfig()


def test_flags_win_over_environment(monkeypatch):
    # Moved from test_server.py with the configuration: parse_args gives the flags,
    # load() adds the environment and the defaults.
    def serve_config(*argv: str) -> ServerConfig:
        return cli.serve_config(cli.build_parser().parse_args(["serve", *argv]))

    monkeypatch.setenv("ENROLLMENT_ADDRESS", "0.0.0.0:6000")
    monkeypatch.setenv("ENROLLMENT_DATABASE_URL", "sqlite:///from-env.db")
    config = serve_config()
    assert (config.address, config.database_url) == ("0.0.0.0:6000", "sqlite:///from-env.db")
    config = serve_config("--address", "127.0.0.1:7000")
    assert (config.address, config.database_url) == ("127.0.0.1:7000", "sqlite:///from-env.db")
    monkeypatch.delenv("ENROLLMENT_ADDRESS")
    monkeypatch.delenv("ENROLLMENT_DATABASE_URL")
    config = serve_config()
    assert (config.address, config.database_url) == ("127.0.0.1:50051", "sqlite:///enrollment.db")


def test_an_empty_variable_counts_as_unset():
    assert load({}, {"ENROLLMENT_WORKERS": "", "ENROLLMENT_TLS_CERT": ""}) == ServerConfig()


def test_a_config_built_in_code_is_checked_the_same_way():
    with pytest.raises(StartupError, match=r"--pool-size 2 is below --threads 4"):
        ServerConfig(pool_size=2).check()
    with pytest.raises(StartupError, match=r"--workers must be 1 to 256, not 0"):
        ServerConfig(workers=0).check()
    with pytest.raises(StartupError, match=r"ENROLLMENT_POOL_SIZE 2 is below --threads 4"):
        load({}, {"ENROLLMENT_POOL_SIZE": "2"})
    # The one missing is spelled as the one given was ("ENROLLMENT_TLS_CERT and
    # --tls-key go together" named a variable and a flag side by side).
    with pytest.raises(StartupError, match=r"ENROLLMENT_TLS_CERT and ENROLLMENT_TLS_KEY go"):
        load({}, {"ENROLLMENT_TLS_CERT": "cert.pem"})
    with pytest.raises(StartupError, match=r"--tls-key and --tls-cert go together"):
        load({"--tls-key": "key.pem"}, {})
    # Found at start-up by the TLS code, which knows no variables: it named the flag.
    with pytest.raises(
        StartupError,
        match=r"ENROLLMENT_TLS_CLIENT_CA turns on mutual TLS, which needs TLS: give "
        r"ENROLLMENT_TLS_CERT and ENROLLMENT_TLS_KEY too",
    ):
        load({}, {"ENROLLMENT_TLS_CLIENT_CA": "ca.pem"})
    with pytest.raises(StartupError, match=r"--tls-client-ca turns on mutual TLS"):
        load({"--tls-client-ca": "ca.pem"}, {})
    # Worker N serves metrics on the port + N - 1: it failed after start-up, naming a
    # port past 65535 that nobody gave.
    with pytest.raises(
        StartupError,
        match=r"--metrics-address 127.0.0.1:65535 with --workers 2 needs ports 65535 to "
        r"65536 \(one per worker\), past 65535",
    ):
        load({"--metrics-address": "127.0.0.1:65535", "--workers": "2"}, {})
    assert load({"--metrics-address": "127.0.0.1:65534", "--workers": "2"}, {}).workers == 2


def test_threads_is_the_name_and_max_workers_an_old_alias():
    serve_help = run("serve", "--help").stdout
    assert "--threads N" in serve_help
    old = serve_help.split("\n  --max-workers", 1)[1].split("\n  --", 1)[0]
    assert "deprecated" in old and "--threads" in old
    assert load({"--max-workers": "7"}, {}).threads == 7
    assert load({"--max-workers": "7", "--threads": "3"}, {}).threads == 3


def test_max_workers_still_serves_and_says_it_is_deprecated(db_url, server_process):
    server = server_process("--database-url", db_url, "--max-workers", "2")
    assert server.stop() == 0, server.log
    assert "--max-workers is deprecated: use --threads" in server.log


def test_server_help_describes_every_subcommand():
    top = run("--help")
    assert top.returncode == 0
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    assert set(commands) == {"serve", "health", "migrate", "rollback", "status", "hash-token"}
    for name, parser in commands.items():
        assert re.search(rf"^    {re.escape(name)}\s+\S", top.stdout, re.M), name
        assert parser.description, name


def test_log_level_after_the_subcommand(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    for argv in (
        ["migrate", "--database-url", url, "--log-level", "DEBUG"],
        ["--log-level", "DEBUG", "status", "--database-url", url],
    ):
        result = run(*argv)
        assert result.returncode == 0, result.stderr
    result = run("status", "--database-url", url, "--log-level", "LOUD")
    one_line_exit_2(result, "--log-level", "'LOUD'")


def test_global_log_level_after_the_subcommand_wins_over_the_one_before(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    result = run("--log-level", "ERROR", "migrate", "--database-url", url, "--log-level", "DEBUG")
    assert result.returncode == 0, result.stderr
    assert "DEBUG" in result.stderr  # peewee's SQL at DEBUG


def test_hash_token_requires_a_name():
    result = run("hash-token", "--role", "reader")
    assert result.returncode == 2
    assert "--name" in result.stderr and result.stdout == ""
    token_help = run("hash-token", "--help").stdout
    assert "--name NAME" in token_help and "required" in token_help


def test_workers_check_the_schema_once(db_url, server_process):
    # A migration this server does not know is logged once per schema check.
    db = pw.SqliteDatabase(db_url.removeprefix("sqlite:///"))
    with db:
        db.execute_sql("INSERT INTO migratehistory (name, migrated_at) VALUES (?, ?)",
                       ("999_from_a_newer_server", "2026-01-01 00:00:00"))  # fmt: skip
    server = server_process("--database-url", db_url, "--workers", "2")
    assert server.stop() == 0, server.log
    out = server.log
    assert out.count("database has migrations this server does not know") == 1, out
    assert out.count("with 2 workers; security: TLS off, mutual TLS off, tokens off") == 1, out


def test_start_up_says_whether_tls_and_tokens_are_on(db_url, server_process):
    server = server_process("--database-url", db_url)
    assert server.stop() == 0, server.log
    assert "; security: TLS off, mutual TLS off, tokens off" in server.log, server.log


def test_a_request_id_retention_below_a_day_is_served_with_a_warning(db_url, server_process):
    # The contract promises a replay for at least 24 hours; a shorter retention was
    # taken without a word, so retries after it quietly ran twice.
    server = server_process("--database-url", db_url, "--request-id-retention", "90m")
    assert server.stop() == 0, server.log
    assert (
        "--request-id-retention is 5400 s, below the 24 hours the API promises: a retry "
        "after that runs again instead of getting the first answer" in server.log
    ), server.log
    server = server_process("--database-url", db_url)
    assert server.stop() == 0, server.log
    assert "--request-id-retention" not in server.log, server.log


@pytest.mark.parametrize("command", ["migrate", "status", "rollback"])
def test_schema_commands_say_an_unreachable_database_in_one_line(command):
    # psycopg2's message carries a hint on lines of its own ("Is the server running…").
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there
        result = run(command, "--database-url", f"postgresql://postgres:pw@127.0.0.1:{port}/x")
    assert result.returncode == 1, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"enrollment-server: {command} failed: "), lines
    assert "pw" not in lines[0].replace("postgres", "")


def _json_lines(stderr: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines()]


def test_with_json_logs_a_failure_to_start_is_a_json_line_too(tmp_path):
    # It was the plain "enrollment-server: …" line, which a JSON log pipeline cannot read.
    missing = tmp_path / "missing.db"
    result = run("serve", "--database-url", f"sqlite:///{missing}", "--log-format", "json")
    assert result.returncode == 2, result.stderr
    (entry,) = _json_lines(result.stderr)
    assert entry["level"] == "ERROR" and "does not exist" in entry["message"], entry
    # A bad flag value too, given through the environment.
    result = run("serve", env={"ENROLLMENT_LOG_FORMAT": "json", "ENROLLMENT_THREADS": "0"})
    assert result.returncode == 2, result.stderr
    (entry,) = _json_lines(result.stderr)
    assert entry["level"] == "ERROR" and "ENROLLMENT_THREADS" in entry["message"], entry


def test_schema_commands_follow_enrollment_log_format(tmp_path):
    # migrate, status and rollback logged text lines whatever ENROLLMENT_LOG_FORMAT said.
    url = f"sqlite:///{tmp_path / 'json.db'}"
    env = {"ENROLLMENT_LOG_FORMAT": "json"}
    result = run("migrate", "--database-url", url, env=env)
    assert result.returncode == 0, result.stderr
    entries = _json_lines(result.stderr)
    assert entries and {entry["level"] for entry in entries} == {"INFO"}, result.stderr
    done = run("rollback", "--database-url", url, env=env)
    assert done.returncode == 0, done.stderr
    assert all(entry["level"] for entry in _json_lines(done.stderr)), done.stderr
    result = run("status", "--database-url", f"sqlite:///{tmp_path / 'none.db'}", env=env)
    assert result.returncode == 2, result.stderr
    (entry,) = _json_lines(result.stderr)
    assert entry["level"] == "ERROR", entry
    # --log-format too, before or after the command, as --log-level: it was refused as
    # an unrecognized argument.
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    for args in (["status", "--log-format", "json"], ["--log-format", "json", "status"]):
        result = run(*args, "--database-url", missing)
        assert result.returncode == 2, result.stderr
        (entry,) = _json_lines(result.stderr)
        assert entry["level"] == "ERROR", entry


@pytest.mark.parametrize("command", ["migrate", "status", "rollback"])
def test_schema_commands_refuse_a_bad_enrollment_log_format(tmp_path, command):
    # They logged text and went on, where serve refuses the same variable.
    database = tmp_path / "x.db"
    result = run(
        command, "--database-url", f"sqlite:///{database}", env={"ENROLLMENT_LOG_FORMAT": "xml"}
    )
    one_line_exit_2(result, "ENROLLMENT_LOG_FORMAT", "text, json", "'xml'")
    assert not database.exists(), "nothing done"


@pytest.mark.parametrize(
    "value, wanted",
    [
        ("0", "above 0 and at most 2147483 (about 24 days)"),
        ("-1", "above 0 and at most 2147483 (about 24 days)"),
        ("1e9", "above 0 and at most 2147483 (about 24 days)"),
        # Not a number: said as serve says it of its own seconds settings.
        ("nan", "a number of seconds"),
        ("abc", "a number of seconds"),
    ],
)
def test_health_timeout_must_be_above_0(value, wanted):
    # --timeout 0 meant no deadline at all and -1 one already past.
    result = run("health", "--address", "127.0.0.1:1", "--timeout", value)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.splitlines()[-1] == (
        f"enrollment-server health: error: argument --timeout: must be {wanted}, not {value!r}"
    ), result.stderr
    serve = run("serve", "--database-timeout", value)
    assert f"--database-timeout must be {wanted}, not {value!r}" in serve.stderr, serve.stderr


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder on a read-only file system holding a migrated database, x.db."""
    source = tmp_path / "source"
    source.mkdir()
    assert run("migrate", "--database-url", f"sqlite:///{source / 'x.db'}").returncode == 0
    for suffix in ("-wal", "-shm"):
        (source / f"x.db{suffix}").unlink(missing_ok=True)
    with read_only_view(source, tmp_path / "read-only") as folder:
        yield folder


@pytest.mark.parametrize(
    "command, name",
    [
        ("serve", "x.db"),
        ("status", "x.db"),
        ("rollback", "x.db"),
        ("migrate", "x.db"),
        ("migrate", "new.db"),
    ],
)
def test_a_sqlite_file_on_a_read_only_file_system_is_named_at_start_up(
    read_only_folder, command, name
):
    # It was "unable to open database file" (exit 1 after a start), which names no cause.
    path = read_only_folder / name
    result = run(command, "--database-url", f"sqlite:///{path}")
    one_line_exit_2(result, f"the SQLite file '{path}' is on a read-only file system")
