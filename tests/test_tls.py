"""TLS and mutual TLS: with a throwaway CA, through the library, the CLI and grpcurl."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from enrollment.client.api import ClientError, EnrollmentClient
from enrollment.server.persistence import engine
from enrollment.server.startup.config import ServerConfig, StartupError, load
from enrollment.server.startup.server import create_server
from enrollment.v1 import enrollment_pb2 as pb
from tests.certs import Authority, Pem
from tests.rpc import TIMEOUT, new_student

# TLS is the transport's: the database does not change it.
pytestmark = pytest.mark.databases("sqlite")

BIN = Path(sys.executable).parent
SERVICE = "enrollment.v1.EnrollmentService"


@dataclass
class Pki:
    ca: Authority
    server: Pem
    client: Pem
    stranger: Pem  # a client certificate from another CA


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = Authority(tmp_path / "pki", "test-ca")
    other = Authority(tmp_path / "pki", "other-ca")
    return Pki(
        ca,
        ca.issue("server", server=True),
        ca.issue("backend", server=False),
        other.issue("intruder", server=False),
    )


def tls_options(pki: Pki, *, mutual: bool) -> dict:
    options = {"tls_cert": str(pki.server.cert), "tls_key": str(pki.server.key)}
    if mutual:
        options["tls_client_ca"] = str(pki.ca.ca_file)
    return options


def credentials(pki: Pki, client: Pem | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.pem.cert_bytes,
        private_key=client.key_bytes if client else None,
        certificate_chain=client.cert_bytes if client else None,
    )


def refused(address: str, creds: grpc.ChannelCredentials | None) -> grpc.RpcError:
    channel = (
        grpc.insecure_channel(address) if creds is None else grpc.secure_channel(address, creds)
    )
    with channel, pytest.raises(grpc.RpcError) as raised:
        channel.unary_unary(f"/{SERVICE}/GetStudent")(
            pb.GetStudentRequest(student_id=1).SerializeToString(), timeout=TIMEOUT
        )
    return raised.value


def test_tls_client_works_and_plaintext_client_fails(start_server, pki):
    live = start_server(credentials=credentials(pki), **tls_options(pki, mutual=False))
    with EnrollmentClient(live.address, tls_ca=str(pki.ca.ca_file), timeout=TIMEOUT) as api:
        ada = api.create_student("Ada Lovelace", "ada@example.com")
        assert api.get_student(ada.id).email == "ada@example.com"
    assert refused(live.address, None).code() == grpc.StatusCode.UNAVAILABLE
    # A client that trusts another CA does not trust this server.
    other = grpc.ssl_channel_credentials(root_certificates=pki.stranger.cert_bytes)
    assert refused(live.address, other).code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_clients_without_a_certificate_of_its_ca(start_server, pki):
    live = start_server(credentials=credentials(pki, pki.client), **tls_options(pki, mutual=True))
    assert new_student(live.stub).id == 1  # the fixture's channel has the right client cert
    assert refused(live.address, credentials(pki)).code() == grpc.StatusCode.UNAVAILABLE
    stranger = credentials(pki, pki.stranger)
    assert refused(live.address, stranger).code() == grpc.StatusCode.UNAVAILABLE
    assert refused(live.address, None).code() == grpc.StatusCode.UNAVAILABLE
    with EnrollmentClient(
        live.address,
        tls_ca=str(pki.ca.ca_file),
        tls_cert=str(pki.client.cert),
        tls_key=str(pki.client.key),
        timeout=TIMEOUT,
    ) as api:
        assert api.get_student(1).id == 1
        with pytest.raises(ClientError) as raised:
            api.get_student(99)
        assert raised.value.reason == "STUDENT_NOT_FOUND"


def grpcurl(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "grpcurl"), "-max-time", "10", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
    )


def test_grpcurl_with_cacert_cert_and_key(start_server, pki, tmp_path):
    live = start_server(credentials=credentials(pki, pki.client), **tls_options(pki, mutual=True))
    mtls = ["-cacert", str(pki.ca.ca_file), "-cert", str(pki.client.cert)]
    mtls += ["-key", str(pki.client.key)]
    body = json.dumps({"name": "Grace Hopper", "email": "grace@example.com"})
    made = grpcurl(*mtls, "-d", body, live.address, f"{SERVICE}/CreateStudent", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["student"]["email"] == "grace@example.com"
    # Reflection works over mTLS too (grpcurl needs nothing but the server).
    assert SERVICE in grpcurl(*mtls, live.address, "list", cwd=tmp_path).stdout
    no_cert = grpcurl("-cacert", str(pki.ca.ca_file), live.address, "list", cwd=tmp_path)
    assert no_cert.returncode != 0
    plaintext = grpcurl("-plaintext", live.address, "list", cwd=tmp_path)
    assert plaintext.returncode != 0


def test_client_cli_tls_flags(start_server, pki, tmp_path):
    live = start_server(credentials=credentials(pki, pki.client), **tls_options(pki, mutual=True))
    new_student(live.stub)
    flags = ["--address", live.address, "--tls-ca", str(pki.ca.ca_file)]
    cmd = [str(BIN / "enrollment-client"), *flags, "--json", "student", "--id", "1"]
    ok = subprocess.run(
        [*cmd, "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["id"] == "1"
    without_cert = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert without_cert.returncode == 1
    assert json.loads(without_cert.stdout)["error"]["code"] == "UNAVAILABLE"
    lone = subprocess.run(
        [*cmd, "--tls-cert", str(pki.client.cert)], capture_output=True, text=True, timeout=30
    )
    assert lone.returncode == 2 and "go together" in json.loads(lone.stdout)["error"]["message"]


def test_health_command_speaks_tls_and_mtls(start_server, pki):
    live = start_server(credentials=credentials(pki, pki.client), **tls_options(pki, mutual=True))
    health = [str(BIN / "enrollment-server"), "health", "--address", live.address]
    ca = ["--tls-ca", str(pki.ca.ca_file)]
    cert = ["--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]

    def run(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([*health, *flags], capture_output=True, text=True, timeout=30)

    ok = run(*ca, *cert)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("SERVING"), ok.stderr
    assert run(*ca).returncode == 1  # mTLS: no client certificate, no answer
    assert run().returncode == 1  # plaintext to a TLS server


def test_a_tls_mismatch_is_named_in_the_error(start_server, pki):
    secure = start_server(credentials=credentials(pki), **tls_options(pki, mutual=False))
    client = [str(BIN / "enrollment-client"), "--timeout", "10"]
    health = [str(BIN / "enrollment-server"), "health", "--timeout", "10"]
    ca = ["--tls-ca", str(pki.ca.ca_file)]

    def stderr(*argv: str) -> str:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert done.returncode == 1, done
        return done.stderr

    # Plaintext to a TLS server: grpc says only "Socket closed".
    for argv in ([*client, "--address", secure.address, "courses"],
                 [*health, "--address", secure.address]):  # fmt: skip
        text = stderr(*argv)
        assert "UNAVAILABLE" in text and "the server may expect TLS" in text, text
        assert not re.search(r"^[IWE]\d{4} ", text, re.M), text  # no grpc core lines
    # TLS to a plaintext server.
    secure.running.stop(None).wait(10)
    plain = start_server()
    for argv in ([*client, "--address", plain.address, *ca, "courses"],
                 [*health, "--address", plain.address, *ca]):  # fmt: skip
        text = stderr(*argv)
        assert "the server may not speak TLS" in text, text
        assert not re.search(r"^[IWE]\d{4} ", text, re.M), text


def test_mutual_tls_without_a_client_certificate_is_named(start_server, pki):
    live = start_server(credentials=credentials(pki, pki.client), **tls_options(pki, mutual=True))
    argv = [str(BIN / "enrollment-client"), "--address", live.address]
    argv += ["--tls-ca", str(pki.ca.ca_file), "--json", "courses"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    error = json.loads(done.stdout)["error"]
    assert error["code"] == "UNAVAILABLE"
    assert "client certificate" in error["message"], error


def test_start_up_logs_tls_mutual_tls_and_tokens(db_url, pki, tmp_path, server_process):
    tokens = tmp_path / "tokens.txt"
    made = subprocess.run(
        [str(BIN / "enrollment-server"), "hash-token", "--role", "reader", "--name", "probe"],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    tokens.write_text(made.stdout)
    options = tls_options(pki, mutual=True)
    server = server_process(
        "--database-url", db_url, "--tls-cert", options["tls_cert"],
        "--tls-key", options["tls_key"], "--tls-client-ca", options["tls_client_ca"],
        "--auth-tokens", str(tokens), credentials=credentials(pki, pki.client),
    )  # fmt: skip
    assert server.stop() == 0, server.log
    assert "; security: TLS on, mutual TLS on, tokens on" in server.log, server.log


@pytest.mark.parametrize(
    "case, expected",
    [
        ("cert-only", "--tls-cert and --tls-key go together"),
        # It said "--tls-cert and --tls-key go together", naming two flags not given.
        (
            "client-ca-only",
            "--tls-client-ca turns on mutual TLS, which needs TLS: give "
            "--tls-cert and --tls-key too",
        ),
        ("wrong-key", "are not a PEM certificate and its private key"),
        ("bad-ca", "--tls-client-ca"),
        ("missing-ca", "--tls-client-ca"),
    ],
)
def test_unusable_tls_files_are_clear_startup_errors(db_url, pki, tmp_path, case, expected):
    options = tls_options(pki, mutual=True)
    if case == "cert-only":
        del options["tls_key"]
    elif case == "client-ca-only":
        del options["tls_key"], options["tls_cert"]
    elif case == "wrong-key":
        options["tls_key"] = str(pki.client.key)
    elif case == "bad-ca":
        (tmp_path / "not-a-ca.pem").write_text("hello\n")
        options["tls_client_ca"] = str(tmp_path / "not-a-ca.pem")
    else:
        options["tls_client_ca"] = str(tmp_path / "missing.pem")
    with pytest.raises(StartupError, match=expected):
        create_server(ServerConfig(address="127.0.0.1:0", database_url=db_url, **options))


@pytest.mark.parametrize(
    "address, tls, warns",
    [
        ("0.0.0.0:0", False, True),
        ("0.0.0.0:0", True, False),
        ("127.0.0.1:0", False, False),
        ("localhost:0", False, False),
    ],
)
def test_plaintext_on_a_non_loopback_address_warns(db_url, pki, caplog, address, tls, warns):
    caplog.set_level(logging.WARNING, logger="enrollment.server")
    options = tls_options(pki, mutual=False) if tls else {}
    running = create_server(ServerConfig(address=address, database_url=db_url, **options))
    try:
        assert running.port > 0
    finally:
        running.stop(None).wait(10)
        engine.close_pool()
    assert ("PLAINTEXT" in caplog.text) == warns, caplog.text


@pytest.mark.parametrize(
    "case, expected",
    [
        # grpc's core logged lines and the call failed UNAVAILABLE, exit 1.
        ("ca-not-pem", "--tls-ca '{dir}/hello.pem' is not a PEM CA certificate"),
        (
            "cert-not-pem",
            "--tls-cert '{dir}/hello.pem' and --tls-key '{key}' are not a PEM "
            "certificate and its private key",
        ),
        (
            "wrong-key",
            "--tls-cert '{cert}' and --tls-key '{dir}/other.key' are not a PEM "
            "certificate and its private key",
        ),
        # It said "[Errno 2] No such file or directory: '...'", naming no option.
        ("ca-missing", "cannot read --tls-ca '{dir}/missing.pem': No such file or directory"),
        ("key-missing", "cannot read --tls-key '{dir}/missing.pem': No such file or directory"),
        # It said "tls_cert and tls_key go together": the library's names.
        ("cert-only", "--tls-cert and --tls-key go together: give both"),
    ],
)
def test_unusable_client_tls_files_are_usage_errors_naming_the_flag(pki, tmp_path, case, expected):
    (tmp_path / "hello.pem").write_text("hello\n")
    other = Authority(tmp_path / "more", "more-ca").issue("x", server=False)
    (tmp_path / "other.key").write_bytes(other.key_bytes)
    files = {"--tls-ca": str(pki.ca.ca_file), "--tls-cert": str(pki.client.cert),
             "--tls-key": str(pki.client.key)}  # fmt: skip
    if case == "ca-not-pem":
        files["--tls-ca"] = str(tmp_path / "hello.pem")
    elif case == "cert-not-pem":
        files["--tls-cert"] = str(tmp_path / "hello.pem")
    elif case == "wrong-key":
        files["--tls-key"] = str(tmp_path / "other.key")
    elif case == "ca-missing":
        files["--tls-ca"] = str(tmp_path / "missing.pem")
    elif case == "key-missing":
        files["--tls-key"] = str(tmp_path / "missing.pem")
    else:
        del files["--tls-key"]
    message = expected.format(dir=tmp_path, key=pki.client.key, cert=pki.client.cert)
    flags = [part for pair in files.items() for part in pair]
    client = [str(BIN / "enrollment-client"), "--address", "127.0.0.1:1", *flags]
    health = [str(BIN / "enrollment-server"), "health", "--address", "127.0.0.1:1", *flags]
    for argv, prefix in ((client, "enrollment-client"), (health, "enrollment-server")):
        done = subprocess.run(
            [*argv, *(["student", "--id", "1"] if argv is client else [])],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert (done.returncode, done.stdout) == (2, ""), (argv, done.stderr)
        assert done.stderr.splitlines()[-1].startswith(f"{prefix}: "), done.stderr
        assert message in done.stderr.splitlines()[-1], done.stderr
    # The library names its own parameters.
    with pytest.raises(ValueError, match=re.escape(message.replace("--tls-", "tls_"))):
        EnrollmentClient("127.0.0.1:1", **{k[2:].replace("-", "_"): v for k, v in files.items()})


@pytest.mark.parametrize("case", ["wrong-key", "bad-ca"])
def test_unusable_tls_files_given_by_variable_are_named_by_variable(db_url, pki, tmp_path, case):
    # Given as ENROLLMENT_TLS_*, the error still said --tls-cert/--tls-key: an operator
    # looking at a systemd unit or a compose file found no such flag.
    options = tls_options(pki, mutual=True)
    if case == "wrong-key":
        options["tls_key"] = str(pki.client.key)
        expected = r"ENROLLMENT_TLS_CERT '.*' and ENROLLMENT_TLS_KEY '.*' are not a PEM"
    else:
        (tmp_path / "not-a-ca.pem").write_text("hello\n")
        options["tls_client_ca"] = str(tmp_path / "not-a-ca.pem")
        expected = r"ENROLLMENT_TLS_CLIENT_CA '.*' is not a PEM CA certificate"
    environ = {f"ENROLLMENT_{name.upper()}": value for name, value in options.items()}
    config = load({"--address": "127.0.0.1:0", "--database-url": db_url}, environ)
    with pytest.raises(StartupError, match=expected) as raised:
        create_server(config)
    assert "--tls" not in str(raised.value)
