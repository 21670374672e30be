"""contrib/csrproxy-client.sh, run by sh, dash (unless it is sh) and busybox sh with only
busybox's applets (and openssl, curl) on PATH: against twistd csrproxy and pebble (issue,
renew when due, key rotation, the async path, the exit codes of csrproxy-client), and
against a small local server for what csrproxy never answers (redirects, a Location
elsewhere, a 429 past the deadline, https with and without --ca-file)."""

from __future__ import annotations

import datetime
import itertools
import os
import shutil
import socket
import ssl
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from csrproxy.client.cli import main as python_client
from csrproxy.names import key_label
from csrproxy.testing.daemon import Csrproxy, start_csrproxy
from csrproxy.testing.pebble import Pebble
from csrproxy.web.auth import token_hash
from tests.conftest import ZONE
from tests.support.tls import CA as TLS_CA
from tests.support.tls import CERT as TLS_CERT
from tests.support.tls import KEY as TLS_KEY

pytestmark = pytest.mark.integration

SCRIPT = Path(__file__).resolve().parents[2] / "contrib" / "csrproxy-client.sh"
WORKTREE = str(SCRIPT.parents[1])
TOKEN = "shell-client-token"
NO_BUDGETS = {
    "new_names_per_week": 0,
    "orders_per_3h": 0,
    "same_names_per_week": 0,
    "client_requests_per_hour": 0,
}
SHELLS = {"sh": ["sh"], "dash": ["dash"], "busybox": ["busybox", "sh"]}
# What the script runs besides openssl and curl. Under busybox sh each is busybox's applet
# (an appliance's view: nothing else on PATH); sh and dash use the system's.
APPLETS = "awk cat chmod cmp cp cut date grep head kill ls mkdir mv pwd rm sed sh sleep sort"
APPLETS += " sync tr touch true false"
# One throwaway CA for the certificates the tests plant (made once: key generation is slow).
PLANT_CA_KEY = ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(params=sorted(SHELLS), scope="module")
def shell(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    argv = SHELLS[request.param]
    found = shutil.which(argv[0])
    if found is None:
        pytest.skip(f"{argv[0]} is not installed (scripts/install-system-deps installs it)")
    if request.param == "dash":
        sh = shutil.which("sh")
        if sh and os.path.realpath(found) == os.path.realpath(sh):
            pytest.skip(f"dash is sh here ({os.path.realpath(sh)}): the sh runs are its runs")
    if request.param == "busybox":
        assert found is not None
        bin_dir = tmp_path_factory.mktemp("busybox-applets")
        for applet in APPLETS.split():
            (bin_dir / applet).symlink_to(found)
        for tool in ("openssl", "curl"):
            (bin_dir / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
        return ["env", f"PATH={bin_dir}", found, "sh"]
    return argv


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("shell-client-files")
    (d / "token").write_text(TOKEN + "\n")
    (d / "bad-token").write_text("not-the-token\n")
    for name in ("token", "bad-token"):
        (d / name).chmod(0o600)
    return d


@pytest.fixture(scope="module")
def signer(
    tmp_path_factory: pytest.TempPathFactory, pebble: Pebble, dns_port: int, files: Path
) -> Iterator[Csrproxy]:
    work = tmp_path_factory.mktemp("shell-client-daemon")
    tokens = work / "tokens"
    tokens.write_text(f"{token_hash(TOKEN)}\n")
    overrides: dict[str, dict[str, Any]] = {
        "acme": {"poll_interval": 0.005, "poll_max": 0.5},
        # A synchronous sign gives up at once: every new order answers 202 and is polled.
        "api": {"tokens_file": str(tokens), "sync_timeout": 0.01},
        "policy": {"names": [f"{{label}}.{ZONE}", f"{{key}}.{ZONE}"], **NO_BUDGETS},
    }
    env = {"PYTHONPATH": WORKTREE}
    with start_csrproxy(str(work), pebble, dns_port, ZONE, overrides=overrides, env=env) as d:
        yield d


@pytest.fixture(scope="module")
def root(pebble: Pebble, files: Path) -> Path:
    path = files / "root.pem"
    path.write_bytes(pebble.root_pem())
    return path


def run(
    shell: Sequence[str], *args: str | Path, umask: int = 0o022, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*shell, str(SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        umask=umask,
        check=False,
    )


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, done.stderr
    return done


def issue_args(
    url: str, directory: str | Path, files: Path, *extra: str | Path
) -> list[str | Path]:
    token: list[str | Path] = ["--token-file", files / "token", "--insecure"]
    return ["issue", "--url", url, "--dir", directory, *token, *extra]


def chain_of(directory: Path) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates((directory / "cert.pem").read_bytes())


def sans(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return ext.get_values_for_type(x509.DNSName)


def key_of(directory: Path) -> Any:
    return serialization.load_pem_private_key((directory / "key.pem").read_bytes(), None)


def spki(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def check_installed(directory: Path, root: Path, names: list[str]) -> list[x509.Certificate]:
    """key.pem 0600 and the key of the leaf; the names; each certificate signed by the next,
    the last by pebble's root; chain.pem the intermediates."""
    assert stat.S_IMODE((directory / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((directory / "csrproxy.state").stat().st_mode) == 0o600
    chain = chain_of(directory)
    assert spki(chain[0].public_key()) == spki(key_of(directory).public_key())
    assert sans(chain[0]) == names
    for cert, issuer in itertools.pairwise(chain):
        cert.verify_directly_issued_by(issuer)
    chain[-1].verify_directly_issued_by(x509.load_pem_x509_certificate(root.read_bytes()))
    assert x509.load_pem_x509_certificates((directory / "chain.pem").read_bytes()) == chain[1:]
    assert not [p.name for p in directory.iterdir() if p.name.startswith(".")]  # no temp, no lock
    return chain


def plant_due_certificate(directory: Path) -> bytes:
    """Replace cert.pem by one for the same key with a tenth of its life left."""
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "planted")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key_of(directory).public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=9))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(PLANT_CA_KEY, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (directory / "cert.pem").write_bytes(pem)
    return pem


def test_issue_renew_and_rotate(
    shell: list[str], signer: Csrproxy, files: Path, root: Path, tmp_path: Path
) -> None:
    tls = tmp_path / "tls"
    # A wide umask does not widen the key: it is made 0600 whatever the umask.
    done = ok(run(shell, *issue_args(signer.url, tls, files, "--root", root, "-v"), umask=0))
    # The daemon's sync_timeout passed: its 202 was polled (the fallback without --async).
    assert "polling /v1/orders/" in done.stderr, done.stderr
    assert "Prefer" not in done.stderr
    key = key_of(tls)
    own_name = [f"{key_label(spki(key.public_key()))}.{ZONE}"]  # {key}: asked of /v1/name
    first = check_installed(tls, root, own_name)
    assert "names=" + own_name[0] in (tls / "csrproxy.state").read_text().splitlines()
    key_pem = (tls / "key.pem").read_bytes()

    # Not due: nothing changes, exit 0, no reload.
    done = ok(run(shell, "renew", "--dir", tls, "--reload-command", "exit 9"))
    assert "not due" in done.stderr
    assert chain_of(tls) == first

    # The server holds a newer chain for the certificate id: installed, no new order.
    planted = plant_due_certificate(tls)
    done = ok(run(shell, "renew", "--dir", tls, "-v"))
    assert "fetched-newer" in done.stderr, done.stderr
    assert "POST" not in done.stderr
    assert (tls / "key.pem").read_bytes() == key_pem
    assert chain_of(tls) == first

    # Due (a tenth of its life left) and no id to look up: signed again, same key and name.
    state = tls / "csrproxy.state"
    lines = state.read_text().splitlines()
    state.write_text("".join(f"{x}\n" for x in lines if not x.startswith("certificate_id=")))
    planted = plant_due_certificate(tls)
    reloaded = tmp_path / "reloaded"
    done = ok(run(shell, "renew", "--dir", tls, "-v", "--reload-command", f"touch {reloaded}"))
    assert "renewing: " in done.stderr and "POST" in done.stderr, done.stderr
    assert reloaded.exists()  # after the change
    assert (tls / "cert.pem").read_bytes() != planted
    assert (tls / "key.pem").read_bytes() == key_pem
    check_installed(tls, root, own_name)
    ids = [x for x in state.read_text().splitlines() if x.startswith("certificate_id=")]
    assert ids and ids != ["certificate_id="]  # learnt again from the answer

    # Forced: the same key again (the server may answer the chain it holds).
    ok(run(shell, "renew", "--dir", tls, "--force"))
    assert (tls / "key.pem").read_bytes() == key_pem
    check_installed(tls, root, own_name)

    # --rotate-key: a new key, and the new key's own name (asked again of /v1/name).
    # A failing reload after the change: exit 4, the new files stay.
    done = run(shell, "renew", "--dir", tls, "--rotate-key", "--reload-command", "exit 9")
    assert done.returncode == 4, done.stderr
    assert (tls / "key.pem").read_bytes() != key_pem
    new_name = [f"{key_label(spki(key_of(tls).public_key()))}.{ZONE}"]
    assert new_name != own_name
    check_installed(tls, root, new_name)


def test_named_rsa_certificate_asynchronously(
    shell: list[str], signer: Csrproxy, files: Path, root: Path, tmp_path: Path
) -> None:
    name = f"async-{len(shell)}.{ZONE}"
    extra = ("--name", name, "--key-type", "rsa2048", "--async", "-v")
    done = ok(run(shell, *issue_args(signer.url, tmp_path, files, *extra)))
    assert "polling /v1/orders/" in done.stderr
    check_installed(tmp_path, root, [name])
    assert key_of(tmp_path).key_size == 2048
    # Again without --key-type: the key is kept, and the state says what it is.
    key = (tmp_path / "key.pem").read_bytes()
    ok(run(shell, *issue_args(signer.url, tmp_path, files, "--name", name)))
    assert (tmp_path / "key.pem").read_bytes() == key
    assert "key_type=rsa2048" in (tmp_path / "csrproxy.state").read_text().splitlines()


def same_code_as_python(
    shell: list[str], tmp_path: Path, args: Sequence[str | Path], expected: int
) -> None:
    """The script and csrproxy-client exit with ``expected`` for the same command line."""
    mine = run(shell, *[a if a != "DIR" else tmp_path / "sh" for a in args])
    theirs = python_client([str(a if a != "DIR" else tmp_path / "py") for a in args])
    assert (mine.returncode, theirs) == (expected, expected), mine.stderr


def test_exit_codes_are_csrproxy_clients(
    shell: list[str], signer: Csrproxy, files: Path, tmp_path: Path
) -> None:
    url = signer.url
    base: list[str | Path] = ["issue", "--url", url, "--dir", "DIR", "--insecure"]
    # A bad token: the server refuses, 1.
    same_code_as_python(shell, tmp_path, [*base, "--token-file", files / "bad-token"], 1)
    # A name outside the policy: refused, 1.
    evil = [*base, "--token-file", files / "token", "--name", "x.example.com"]
    same_code_as_python(shell, tmp_path, evil, 1)
    # The token over http:// without --insecure: usage, 2 (before any request).
    plain: list[str | Path] = [
        "issue",
        "--url",
        url,
        "--dir",
        "DIR",
        "--token-file",
        files / "token",
    ]
    same_code_as_python(shell, tmp_path, plain, 2)
    # No state to renew from: usage, 2.
    same_code_as_python(shell, tmp_path, ["renew", "--dir", tmp_path], 2)
    # The server is down: network, 3.
    down: list[str | Path] = [
        "issue",
        "--url",
        f"http://127.0.0.1:{closed_port()}",
        "--dir",
        "DIR",
        "--insecure",
    ]
    same_code_as_python(shell, tmp_path, [*down, "--token-file", files / "token"], 3)
    # Bad arguments: 2.
    assert run(shell, "issue", "--dir", tmp_path, "--timeout", "soon").returncode == 2
    assert run(shell, "frobnicate").returncode == 2


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Fake:
    """A local HTTP server that answers every request with ``answer(path)``: (status,
    headers, body); it records the paths asked."""

    def __init__(
        self, answer: Callable[[str], tuple[int, dict[str, str], bytes]], tls: bool = False
    ) -> None:
        self.paths: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def handle_one(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                fake.paths.append(self.path)
                status, headers, body = answer(self.path)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = handle_one

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(TLS_CERT, TLS_KEY)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.01,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake(request: pytest.FixtureRequest) -> Iterator[Callable[..., Fake]]:
    made: list[Fake] = []

    def make(answer: Callable[[str], tuple[int, dict[str, str], bytes]], tls: bool = False) -> Fake:
        made.append(Fake(answer, tls))
        return made[-1]

    yield make
    for f in made:
        f.close()


NAME_DOC = b'{"names": ["{label}.go.example.test"], "key_label": "x"}'


def test_no_redirect_is_followed(
    shell: list[str], fake: Callable[..., Fake], files: Path, tmp_path: Path
) -> None:
    elsewhere = fake(lambda path: (200, {}, b""))
    server = fake(lambda path: (307, {"Location": elsewhere.url + path}, b""))
    args = [*issue_args(server.url, "DIR", files, "--name", f"a.{ZONE}")]
    same_code_as_python(shell, tmp_path, args, 1)
    assert elsewhere.paths == []


def test_a_location_in_another_origin_is_refused(
    shell: list[str], fake: Callable[..., Fake], files: Path, tmp_path: Path
) -> None:
    elsewhere = fake(lambda path: (200, {}, b'{"status": "valid"}'))
    order = {"Location": elsewhere.url + "/v1/orders/1", "Retry-After": "1"}
    server = fake(lambda path: (202, order, b'{"status": "processing"}'))
    args = [*issue_args(server.url, "DIR", files, "--name", f"a.{ZONE}")]
    same_code_as_python(shell, tmp_path, args, 1)
    assert elsewhere.paths == []


def test_a_retry_after_past_the_deadline_is_refused_at_once(
    shell: list[str], fake: Callable[..., Fake], files: Path, tmp_path: Path
) -> None:
    busy = b'{"type": "https://csrproxy.dev/problems/rate-limited", "detail": "busy"}'
    server = fake(lambda path: (429, {"Retry-After": "3600"}, busy))
    args = issue_args(server.url, "DIR", files, "--name", f"a.{ZONE}", "--timeout", "30")
    same_code_as_python(shell, tmp_path, args, 1)
    assert server.paths == ["/v1/sign", "/v1/sign"]  # one each, no retry


def test_polling_honours_retry_after_and_its_bound(
    shell: list[str], fake: Callable[..., Fake], files: Path, tmp_path: Path
) -> None:
    order = {"Location": "/v1/orders/1", "Retry-After": "1"}
    server = fake(lambda path: (202, order, b'{"status": "processing"}'))
    args = issue_args(server.url, tmp_path, files, "--name", f"a.{ZONE}", "--timeout", "3")
    done = run(shell, *args)
    assert done.returncode == 3, done.stderr  # no certificate before --timeout
    assert "deadline" in done.stderr
    polls = server.paths[1:]
    assert polls and set(polls) == {"/v1/orders/1"} and len(polls) <= 3


def test_https_trusts_the_ca_file_only(
    shell: list[str], fake: Callable[..., Fake], files: Path, tmp_path: Path
) -> None:
    refusal = b'{"type": "https://csrproxy.dev/problems/unauthorized", "detail": "no"}'
    server = fake(
        lambda path: (401, {"Content-Type": "application/problem+json"}, refusal), tls=True
    )
    # The token goes over https:// without --insecure; the server is reached and refuses: 1.
    args: list[str | Path] = ["issue", "--url", server.url, "--dir", "DIR", "--name", f"a.{ZONE}"]
    args += ["--token-file", files / "token"]
    same_code_as_python(shell, tmp_path / "trusted", [*args, "--cacert", TLS_CA], 1)
    mine = run(
        shell,
        *[tmp_path / "trusted" / "sh" if a == "DIR" else a for a in args],
        "--ca-file",
        TLS_CA,
    )
    assert mine.returncode == 1 and "no (unauthorized)" in mine.stderr, mine.stderr
    # Without the CA file the server's certificate is not trusted: the network failed, 3.
    same_code_as_python(shell, tmp_path / "untrusted", args, 3)


def test_a_directory_others_can_write_or_a_linked_key_is_refused(
    shell: list[str], signer: Csrproxy, files: Path, tmp_path: Path
) -> None:
    args = issue_args(signer.url, "DIR", files, "--name", f"a.{ZONE}")
    for tool in ("sh", "py"):
        (tmp_path / "wide" / tool).mkdir(parents=True)
        (tmp_path / "wide" / tool).chmod(0o777)
        (tmp_path / "linked" / tool).mkdir(parents=True, mode=0o700)
        (tmp_path / "linked" / tool / "key.pem").symlink_to(tmp_path / "elsewhere.pem")
    same_code_as_python(shell, tmp_path / "wide", args, 2)
    same_code_as_python(shell, tmp_path / "linked", args, 2)
    assert not (tmp_path / "elsewhere.pem").exists()


def test_a_held_lock_waits_until_the_deadline_and_a_dead_one_is_taken_over(
    shell: list[str], signer: Csrproxy, files: Path, tmp_path: Path
) -> None:
    lock = tmp_path / ".csrproxy-sh.lock"
    lock.mkdir()
    (lock / "pid").write_text(f"{os.getpid()}\n")  # alive: this test
    done = run(shell, *issue_args(signer.url, tmp_path, files, "--timeout", "1"))
    assert done.returncode == 3, done.stderr
    assert "another run holds" in done.stderr
    assert lock.is_dir()  # not ours to remove
    gone = subprocess.Popen(["true"])
    gone.wait()
    (lock / "pid").write_text(f"{gone.pid}\n")
    down = f"http://127.0.0.1:{closed_port()}"
    done = run(shell, *issue_args(down, tmp_path, files, "--name", f"a.{ZONE}"))
    assert done.returncode == 3, done.stderr  # it got the lock, then found no server
    assert "taking over the lock" in done.stderr and "cannot reach" in done.stderr
    assert not lock.exists()


def test_help_names_the_exit_codes(shell: list[str]) -> None:
    done = ok(run(shell, "--help"))
    for code in ("0  ok", "1  the server or the CA refused", "2  usage", "3  network", "4  renew"):
        assert code in done.stdout


def test_the_script_is_posix_sh() -> None:
    for argv in (["dash", "-n"], ["busybox", "sh", "-n"]):
        if shutil.which(argv[0]):
            done = subprocess.run([*argv, str(SCRIPT)], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
    if shutil.which("checkbashisms"):
        done = subprocess.run(
            ["checkbashisms", "-p", "-x", str(SCRIPT)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout + done.stderr
    if shutil.which("shellcheck"):
        done = subprocess.run(
            ["shellcheck", "-s", "sh", str(SCRIPT)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stdout
