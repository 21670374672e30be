"""csrproxy-client: a fake server as the transport and a fake clock, no sockets, no sleeps;
one integration test against the real daemon and pebble."""

from __future__ import annotations

import base64
import datetime
import hashlib
import io
import json
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from csrproxy.client import (
    ClientError,
    Obtained,
    RenewResult,
    TerminalProgress,
    main,
    obtain_certificate,
    renew_if_due,
)
from csrproxy.client.api import certificate_ref
from csrproxy.client.chains import dns_names, pem_of
from csrproxy.client.cli import log as client_log
from csrproxy.client.keys import key_label, load_key, make_csr, public_key_pem, same_key
from csrproxy.client.transport import Request, Response, UrllibTransport

ZONE_T = "go.example.test"
DAY = 86400.0
T0 = 1_800_000_000.0  # 2027-01-15


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class CA:
    """A throwaway root and intermediate that issue real leaf certificates."""

    def __init__(self) -> None:
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = self._cert(_name("Test Root"), self.root_key, _name("Test Root"), T0, True)
        self.int_key = ec.generate_private_key(ec.SECP256R1())
        self.intermediate = self._cert(
            _name("Test Intermediate"), self.int_key.public_key(), _name("Test Root"), T0, True
        )

    def _cert(self, subject: x509.Name, key: Any, issuer: x509.Name, t: float, ca: bool) -> Any:
        pub = key.public_key() if hasattr(key, "public_key") else key
        signer = self.root_key
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(datetime.datetime.fromtimestamp(t - 10 * DAY, datetime.UTC))
            .not_valid_after(datetime.datetime.fromtimestamp(t + 3650 * DAY, datetime.UTC))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(signer, hashes.SHA256())
        )

    def root_pem(self) -> bytes:
        return bytes(self.root.public_bytes(serialization.Encoding.PEM))

    def issue(self, csr: x509.CertificateSigningRequest, start: float, days: float) -> bytes:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        leaf = (
            x509.CertificateBuilder()
            .subject_name(csr.subject)
            .issuer_name(self.intermediate.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(datetime.datetime.fromtimestamp(start - 60, datetime.UTC))
            .not_valid_after(datetime.datetime.fromtimestamp(start + days * DAY, datetime.UTC))
            .add_extension(san, critical=False)
            .sign(self.int_key, hashes.SHA256())
        )
        return pem_of([leaf, self.intermediate])


@dataclass
class Clock:
    t: float = T0
    sleeps: list[float] = field(default_factory=list)

    def now(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds


def label_of(public_pem: bytes) -> str:
    der = serialization.load_pem_public_key(public_pem).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b32encode(hashlib.sha256(der).digest()[:20]).decode().lower()


class FakeServer:
    """csrproxy's API as a transport: sync or async signing, /v1/name, /v1/orders,
    /v1/certificates/<id>; canned answers and network failures on demand."""

    def __init__(self, ca: CA, clock: Clock) -> None:
        self.ca, self.clock = ca, clock
        self.requests: list[Request] = []
        self.days = 90.0
        self.async_polls: int | None = None  # 202 then this many "processing" polls
        self.orders: dict[str, list[Any]] = {}
        self.chains: dict[str, bytes] = {}  # certificate id -> newest chain
        self.ids: dict[bytes, str] = {}  # SPKI + names -> certificate id
        self.canned: dict[str, list[Response]] = {}  # "POST /v1/sign" -> answers, in turn
        self.down = False

    def __call__(self, req: Request) -> Response:
        self.requests.append(req)
        path = req.url.removeprefix("http://csrproxy.test")
        if self.down:
            raise ClientError(f"cannot reach {req.url}: connection refused", 3)
        queue = self.canned.get(f"{req.method} {path}")
        if queue:
            return queue.pop(0)
        if req.method == "POST" and path == "/v1/sign":
            return self.sign(req)
        if path == "/v1/name":
            label = label_of(req.body or b"")
            doc = {"names": [f"{{label}}.{ZONE_T}", f"{label}.{ZONE_T}"], "key_label": label}
            return Response(200, {"content-type": "application/json"}, json.dumps(doc).encode())
        if m := re.fullmatch(r"/v1/orders/(\w+)", path):
            order = self.orders[m.group(1)]
            if order[0] > 0:
                order[0] -= 1
                doc = {"id": m.group(1), "status": "processing"}
                return Response(200, {"retry-after": "3"}, json.dumps(doc).encode())
            doc = {"status": "valid", "certificate": f"/v1/orders/{m.group(1)}/certificate"}
            return Response(200, {}, json.dumps(doc).encode())
        if m := re.fullmatch(r"/v1/orders/(\w+)/certificate", path):
            return self.chain_response(self.orders[m.group(1)][1])
        if m := re.fullmatch(r"/v1/certificates/([\w-]+)", path):
            if m.group(1) not in self.chains:
                return problem(404, "not-found")
            return self.chain_response(m.group(1), {"retry-after": "3600"})
        return problem(404, "not-found")

    def sign(self, req: Request) -> Response:
        csr = x509.load_pem_x509_csr(req.body or b"")
        names = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        spki = csr.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        ident = spki + ",".join(sorted(names.get_values_for_type(x509.DNSName))).encode()
        cid = self.ids.setdefault(ident, f"cert-{len(self.ids)}")
        self.chains[cid] = self.ca.issue(csr, self.clock.t, self.days)
        if self.async_polls is not None:
            oid = f"order{len(self.orders)}"
            self.orders[oid] = [self.async_polls, cid]
            headers = {"location": f"/v1/orders/{oid}", "retry-after": "1"}
            return Response(202, headers, json.dumps({"id": oid}).encode())
        return self.chain_response(cid)

    def chain_response(self, cid: str, extra: dict[str, str] | None = None) -> Response:
        headers = {
            "content-type": "application/pem-certificate-chain",
            "csrproxy-certificate-id": cid,
            "link": f'</v1/certificates/{cid}>; rel="csrproxy-certificate"',
            **(extra or {}),
        }
        return Response(200, headers, self.chains[cid])

    def renew_on_server(self, cid: str) -> None:
        """What the server does on its own: a new chain for the stored CSR's key."""
        leaf = x509.load_pem_x509_certificates(self.chains[cid])[0]
        csr_key = ec.generate_private_key(ec.SECP256R1())  # only to build a CSR shape
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(leaf.subject)
            .add_extension(
                leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value, False
            )
            .sign(csr_key, hashes.SHA256())
        )
        renewed = (
            x509.CertificateBuilder()
            .subject_name(leaf.subject)
            .issuer_name(self.ca.intermediate.subject)
            .public_key(leaf.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(datetime.datetime.fromtimestamp(self.clock.t - 60, datetime.UTC))
            .not_valid_after(
                datetime.datetime.fromtimestamp(self.clock.t + self.days * DAY, datetime.UTC)
            )
            .add_extension(
                csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value, False
            )
            .sign(self.ca.int_key, hashes.SHA256())
        )
        self.chains[cid] = pem_of([renewed, self.ca.intermediate])

    def posts(self) -> int:
        return sum(1 for r in self.requests if r.method == "POST" and r.url.endswith("/v1/sign"))


def problem(status: int, kind: str, headers: dict[str, str] | None = None) -> Response:
    doc = {"type": f"https://csrproxy.dev/problems/{kind}", "status": status, "detail": kind}
    hdrs = {"content-type": "application/problem+json", **(headers or {})}
    return Response(status, hdrs, json.dumps(doc).encode())


URL = "http://csrproxy.test"
NAME = f"host1.{ZONE_T}"


@pytest.fixture
def ca() -> CA:
    return CA()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def server(ca: CA, clock: Clock) -> FakeServer:
    return FakeServer(ca, clock)


def obtain(
    server: FakeServer, clock: Clock, d: Path, names: list[str] | None = None, **kw: Any
) -> Obtained:
    return obtain_certificate(
        URL,
        d,
        [NAME] if names is None else names,
        now=clock.now,
        sleep=clock.sleep,
        transport=server,
        root_pem=server.ca.root_pem(),
        **kw,
    )


def renew(server: FakeServer, clock: Clock, d: Path, **kw: Any) -> RenewResult:
    return renew_if_due(d, now=clock.now, sleep=clock.sleep, transport=server, **kw)


def cli(server: FakeServer, clock: Clock, *argv: str) -> tuple[int, str]:
    err = io.StringIO()
    code = main(list(argv), transport=server, now=clock.now, sleep=clock.sleep, stderr=err)
    return code, err.getvalue()


def leaf_of(d: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates((d / "cert.pem").read_bytes())[0]


def key_bytes(d: Path) -> bytes:
    return (d / "key.pem").read_bytes()


# -- issue -------------------------------------------------------------------------------


def test_issue_writes_key_0600_cert_chain_and_state(
    server: FakeServer, clock: Clock, tmp_path: Path
) -> None:
    result = obtain(server, clock, tmp_path)
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "csrproxy.json").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificates((tmp_path / "cert.pem").read_bytes())
    chain = x509.load_pem_x509_certificates((tmp_path / "chain.pem").read_bytes())
    assert [c.subject for c in cert] == [result.leaf.subject, server.ca.intermediate.subject]
    assert chain == cert[1:]
    assert dns_names(result.leaf) == [NAME]
    state = json.loads((tmp_path / "csrproxy.json").read_text())
    assert state["url"] == URL and state["names"] == [NAME] and not state["discover_names"]
    assert state["certificate_id"] == "cert-0" == result.certificate_id
    assert state["certificate_url"] == f"{URL}/v1/certificates/cert-0"
    assert state["key_type"] == "ec256"
    # No Prefer: respond-async: the client asks synchronously first.
    sign = next(r for r in server.requests if r.method == "POST")
    assert "Prefer" not in sign.headers and "Authorization" not in sign.headers
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_key_is_reused_and_rotated_with_new_key(
    server: FakeServer, clock: Clock, tmp_path: Path
) -> None:
    first = obtain(server, clock, tmp_path)
    key1 = key_bytes(tmp_path)
    second = obtain(server, clock, tmp_path)
    assert key_bytes(tmp_path) == key1
    assert second.leaf.public_key() == first.leaf.public_key()
    third = obtain(server, clock, tmp_path, new_key=True, key_type="ec384")
    assert key_bytes(tmp_path) != key1
    assert third.leaf.public_key() != first.leaf.public_key()
    key = load_key(tmp_path / "key.pem")
    assert same_key(leaf_of(tmp_path), key)
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600
    assert json.loads((tmp_path / "csrproxy.json").read_text())["key_type"] == "ec384"


def test_failed_rotation_keeps_the_old_key(
    server: FakeServer, clock: Clock, tmp_path: Path
) -> None:
    obtain(server, clock, tmp_path)
    before = key_bytes(tmp_path), (tmp_path / "cert.pem").read_bytes()
    server.canned["POST /v1/sign"] = [problem(502, "ca-error")]
    with pytest.raises(ClientError) as e:
        obtain(server, clock, tmp_path, new_key=True)
    assert e.value.exit_code == 1
    assert (key_bytes(tmp_path), (tmp_path / "cert.pem").read_bytes()) == before


@pytest.mark.parametrize("fail", ["replace-cert", "replace-state", "fsync"])
def test_a_crash_mid_write_leaves_the_old_files(
    server: FakeServer,
    clock: Clock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fail: str,
) -> None:
    obtain(server, clock, tmp_path)
    names = ("key.pem", "cert.pem", "chain.pem", "csrproxy.json")
    old = {n: (tmp_path / n).read_bytes() for n in names}
    real_replace, real_fsync = os.replace, os.fsync
    calls = {"fsync": 0}

    def replace(src: Any, dst: Any) -> None:
        if fail == "replace-cert" and str(dst).endswith("cert.pem") and ".tmp" in str(src):
            raise OSError("disk on fire")
        if fail == "replace-state" and str(dst).endswith("csrproxy.json"):
            raise OSError("disk on fire")
        real_replace(src, dst)

    def fsync(fd: int) -> None:
        calls["fsync"] += 1
        if fail == "fsync" and calls["fsync"] == 2:  # chain.pem's temp is written, cert's not
            raise OSError("I/O error")
        real_fsync(fd)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError):
        obtain(server, clock, tmp_path, new_key=True)
    monkeypatch.undo()
    assert {n: (tmp_path / n).read_bytes() for n in names} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, ".csrproxy.lock"])


def test_key_names_come_from_the_server(server: FakeServer, clock: Clock, tmp_path: Path) -> None:
    result = obtain(server, clock, tmp_path, names=[])
    key = load_key(tmp_path / "key.pem")
    label = label_of(public_key_pem(key))
    assert label == key_label(key)
    assert result.names == [f"{label}.{ZONE_T}"]
    name_req = next(r for r in server.requests if r.url.endswith("/v1/name"))
    assert name_req.method == "GET" and name_req.body == public_key_pem(key)
    assert json.loads((tmp_path / "csrproxy.json").read_text())["discover_names"] is True


def test_only_label_patterns_is_a_usage_error(
    server: FakeServer, clock: Clock, tmp_path: Path
) -> None:
    doc = {"names": [f"{{label}}.{ZONE_T}"], "key_label": "x"}
    server.canned["GET /v1/name"] = [Response(200, {}, json.dumps(doc).encode())]
    code, err = cli(server, clock, "issue", "--url", URL, "--dir", str(tmp_path))
    assert code == 2 and "give --name" in err
    assert server.posts() == 0


def test_async_fallback_polls_with_retry_after(
    server: FakeServer, clock: Clock, tmp_path: Path
) -> None:
    server.async_polls = 2
    result = obtain(server, clock, tmp_path)
    assert dns_names(result.leaf) == [NAME]
    # 202 (Retry-After 1), two "processing" polls (Retry-After 3 each), then valid.
    assert clock.sleeps == [1.0, 3.0, 3.0]
    paths = [r.url.removeprefix(URL) for r in server.requests]
    assert paths == [
        "/v1/sign",
        "/v1/orders/order0",
        "/v1/orders/order0",
        "/v1/orders/order0",
        "/v1/orders/order0/certificate",
    ]
    assert result.certificate_id == "cert-0"


def test_polling_gives_up_at_the_deadline(server: FakeServer, clock: Clock, tmp_path: Path) -> None:
    server.async_polls = 10**6
    with pytest.raises(ClientError) as e:
        obtain(server, clock, tmp_path, timeout=30)
    assert e.value.exit_code == 3
    assert clock.t - T0 <= 30
    assert not (tmp_path / "cert.pem").exists()


def test_network_errors_while_polling_are_retried(
    server: FakeServer, clock: Clock, tmp_path: Path
) -> None:
    server.async_polls = 1
    real = server.__call__
    failures = [True]

    def flaky(req: Request) -> Response:
        if "/v1/orders/" in req.url and failures and failures.pop():
            raise ClientError("connection reset", 3)
        return real(req)

    result = obtain_certificate(
        URL, tmp_path, [NAME], now=clock.now, sleep=clock.sleep, transport=flaky
    )
    assert dns_names(result.leaf) == [NAME]


def test_rate_limited_is_retried_after_retry_after(
    server: FakeServer, clock: Clock, tmp_path: Path
) -> None:
    server.canned["POST /v1/sign"] = [problem(429, "rate-limited", {"retry-after": "20"})]
    obtain(server, clock, tmp_path)
    assert clock.sleeps == [20.0] and server.posts() == 2


def test_rate_limited_past_the_deadline_is_refused(
    server: FakeServer, clock: Clock, tmp_path: Path
) -> None:
    server.canned["POST /v1/sign"] = [problem(429, "rate-limited", {"retry-after": "3600"})]
    code, err = cli(server, clock, "issue", "--url", URL, "--dir", str(tmp_path), "--name", NAME)
    assert code == 1 and "retry after" in err and clock.sleeps == []


def test_token_file_is_sent_and_remembered(
    server: FakeServer, clock: Clock, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    d = tmp_path / "tls"
    args = ["issue", "--url", URL, "--dir", str(d), "--name", NAME, "--token-file", str(token)]
    assert cli(server, clock, *args)[0] == 0
    assert all(r.headers["Authorization"] == "Bearer s3cret" for r in server.requests)
    assert json.loads((d / "csrproxy.json").read_text())["token_file"] == str(token.resolve())
    server.requests.clear()
    renew(server, clock, d)
    assert server.requests[0].headers["Authorization"] == "Bearer s3cret"


def test_link_header_alone_gives_the_certificate_id() -> None:
    resp = Response(
        200, {"link": '<https://x.test/v1/certificates/abc>; rel="csrproxy-certificate"'}
    )
    assert certificate_ref(resp, URL) == ("abc", "https://x.test/v1/certificates/abc")
    resp = Response(200, {"csrproxy-certificate-id": "a/b"})
    assert certificate_ref(resp, URL) == ("a/b", f"{URL}/v1/certificates/a%2Fb")
    assert certificate_ref(Response(200, {}), URL) == (None, None)


@pytest.mark.parametrize(
    "damage",
    ["other-key", "other-names", "bad-order", "not-pem", "expired"],
)
def test_a_bad_chain_is_refused(
    server: FakeServer, clock: Clock, tmp_path: Path, ca: CA, damage: str
) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    if damage == "other-key":
        pem = ca.issue(x509.load_pem_x509_csr(make_csr(other, [NAME])), T0, 90)
    elif damage == "other-names":
        obtain(server, clock, tmp_path)
        key = load_key(tmp_path / "key.pem")
        pem = ca.issue(x509.load_pem_x509_csr(make_csr(key, ["x." + ZONE_T])), T0, 90)
    elif damage == "bad-order":
        obtain(server, clock, tmp_path)
        chain = x509.load_pem_x509_certificates((tmp_path / "cert.pem").read_bytes())
        pem = pem_of([chain[0], ca.root])  # the leaf is not signed by the root
    elif damage == "expired":
        obtain(server, clock, tmp_path)
        key = load_key(tmp_path / "key.pem")
        pem = ca.issue(x509.load_pem_x509_csr(make_csr(key, [NAME])), T0 - 100 * DAY, 90)
    else:
        pem = b"<html>proxy error</html>"
    server.canned["POST /v1/sign"] = [Response(200, {}, pem)]
    args = ["issue", "--url", URL, "--dir", str(tmp_path), "--name", NAME]
    code, err = cli(server, clock, *args)
    assert code == 1, err


def test_exit_codes(server: FakeServer, clock: Clock, tmp_path: Path) -> None:
    d = str(tmp_path / "tls")
    assert cli(server, clock, "issue", "--url", URL, "--dir", d, "--name", NAME)[0] == 0
    # usage
    assert cli(server, clock, "issue", "--dir", d)[0] == 2
    assert cli(server, clock, "issue", "--url", URL, "--dir", d, "--key-type", "dsa")[0] == 2
    assert cli(server, clock, "issue", "--url", "ftp://x", "--dir", d)[0] == 2
    assert cli(server, clock, "renew", "--dir", str(tmp_path / "nothing"))[0] == 2
    assert cli(server, clock, "frobnicate")[0] == 2
    assert cli(server, clock, "issue", "--url", URL, "--dir", d, "--token-file", "/nope")[0] == 2
    # refused
    server.canned["POST /v1/sign"] = [problem(403, "name-not-allowed")]
    code, err = cli(server, clock, "issue", "--url", URL, "--dir", d, "--name", "x.example.org")
    assert code == 1 and "403" in err and "name-not-allowed" in err
    # network
    server.down = True
    code, err = cli(server, clock, "issue", "--url", URL, "--dir", d, "--name", NAME)
    assert code == 3 and "cannot reach" in err


def test_the_urllib_transport_maps_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """HTTP errors are answers; failures to connect are EXIT_NETWORK (no socket opened)."""
    import email.message
    import urllib.error
    import urllib.request

    def refused(req: Any, timeout: float, context: Any) -> Any:
        raise urllib.error.URLError(ConnectionRefusedError(111, "Connection refused"))

    monkeypatch.setattr(urllib.request, "urlopen", refused)
    transport = UrllibTransport()
    with pytest.raises(ClientError) as e:
        transport(Request("GET", URL + "/v1/health", {}))
    assert e.value.exit_code == 3 and "Connection refused" in str(e.value)

    def forbidden(req: Any, timeout: float, context: Any) -> Any:
        headers = email.message.Message()
        headers["Retry-After"] = "7"
        raise urllib.error.HTTPError(req.full_url, 429, "no", headers, io.BytesIO(b"{}"))

    monkeypatch.setattr(urllib.request, "urlopen", forbidden)
    resp = transport(Request("POST", URL + "/v1/sign", {}, b"csr"))
    assert resp.status == 429 and resp.header("Retry-After") == "7" and resp.body == b"{}"


# -- renew -------------------------------------------------------------------------------


def test_renew_does_nothing_when_not_due(server: FakeServer, clock: Clock, tmp_path: Path) -> None:
    obtain(server, clock, tmp_path)
    before = (tmp_path / "cert.pem").read_bytes()
    clock.t += 50 * DAY  # 40 of 90 days left: more than a third
    marker = tmp_path / "reloaded"
    result = renew(server, clock, tmp_path, reload_command=f"touch {marker}")
    assert result.action == "unchanged" and not result.changed and not result.reloaded
    assert result.retry_after == 3600.0
    assert (tmp_path / "cert.pem").read_bytes() == before
    assert server.posts() == 1 and not marker.exists()


def test_renew_reissues_when_a_third_is_left(
    server: FakeServer, clock: Clock, tmp_path: Path
) -> None:
    first = obtain(server, clock, tmp_path)
    key = key_bytes(tmp_path)
    clock.t += 61 * DAY  # 29 of 90 days left
    marker = tmp_path / "reloaded"
    result = renew(server, clock, tmp_path, reload_command=f"echo x >> {marker}")
    assert result.action == "reissued" and result.reloaded and result.reload_error is None
    assert marker.read_text() == "x\n"
    assert server.posts() == 2 and key_bytes(tmp_path) == key
    leaf = leaf_of(tmp_path)
    assert leaf.not_valid_after_utc > first.leaf.not_valid_after_utc
    assert leaf.public_key() == first.leaf.public_key()
    assert result.not_after == leaf.not_valid_after_utc
    # Next run: not due again.
    assert renew(server, clock, tmp_path).action == "unchanged"


def test_renew_fetches_the_newer_chain_from_the_server(
    server: FakeServer, clock: Clock, tmp_path: Path
) -> None:
    first = obtain(server, clock, tmp_path)
    clock.t += 30 * DAY  # not due for the client: the server renewed on its own
    server.renew_on_server("cert-0")
    marker = tmp_path / "reloaded"
    result = renew(server, clock, tmp_path, reload_command=f"touch {marker}")
    assert result.action == "fetched-newer" and marker.exists()
    assert server.posts() == 1
    assert leaf_of(tmp_path).not_valid_after_utc > first.leaf.not_valid_after_utc
    assert server.requests[-1].url == f"{URL}/v1/certificates/cert-0"
    assert x509.load_pem_x509_certificates((tmp_path / "chain.pem").read_bytes()) == [
        server.ca.intermediate
    ]


def test_renew_with_force_and_cli(server: FakeServer, clock: Clock, tmp_path: Path) -> None:
    obtain(server, clock, tmp_path)
    code, err = cli(server, clock, "renew", "--dir", str(tmp_path))
    assert code == 0 and "unchanged" in err and server.posts() == 1
    clock.t += 1
    code, err = cli(server, clock, "renew", "--dir", str(tmp_path), "--force")
    assert code == 0 and "reissued" in err and server.posts() == 2


def test_renew_when_the_server_is_down(server: FakeServer, clock: Clock, tmp_path: Path) -> None:
    obtain(server, clock, tmp_path)
    server.down = True
    result = renew(server, clock, tmp_path)  # not due: a warning, nothing else
    assert result.action == "unchanged" and result.warning and "cannot reach" in result.warning
    clock.t += 80 * DAY
    code, _ = cli(server, clock, "renew", "--dir", str(tmp_path))
    assert code == 3


def test_renew_ignores_a_fetched_chain_for_another_key(
    server: FakeServer, clock: Clock, tmp_path: Path, ca: CA
) -> None:
    obtain(server, clock, tmp_path)
    other = ec.generate_private_key(ec.SECP256R1())
    pem = ca.issue(x509.load_pem_x509_csr(make_csr(other, [NAME])), T0 + DAY, 90)
    server.canned["GET /v1/certificates/cert-0"] = [Response(200, {}, pem)]
    clock.t += DAY
    result = renew(server, clock, tmp_path)
    assert result.action == "unchanged" and "not our key" in (result.warning or "")


def test_renew_rediscovers_key_names(server: FakeServer, clock: Clock, tmp_path: Path) -> None:
    first = obtain(server, clock, tmp_path, names=[])
    clock.t += 70 * DAY
    result = renew(server, clock, tmp_path)
    assert result.action == "reissued"
    assert dns_names(leaf_of(tmp_path)) == first.names


def test_renew_repairs_a_missing_certificate(
    server: FakeServer, clock: Clock, tmp_path: Path
) -> None:
    obtain(server, clock, tmp_path)
    (tmp_path / "cert.pem").unlink()
    result = renew(server, clock, tmp_path)
    # The server's newest chain is as good as any: no new order.
    assert result.action == "fetched-newer" and server.posts() == 1
    assert (tmp_path / "cert.pem").exists()


def test_reload_failure_is_exit_4(server: FakeServer, clock: Clock, tmp_path: Path) -> None:
    obtain(server, clock, tmp_path)
    clock.t += 70 * DAY
    code, err = cli(server, clock, "renew", "--dir", str(tmp_path), "--reload-command", "exit 7")
    assert code == 4 and "exited with 7" in err
    assert leaf_of(tmp_path).not_valid_after_utc.timestamp() > T0 + 90 * DAY


def test_reload_timeout(server: FakeServer, clock: Clock, tmp_path: Path) -> None:
    obtain(server, clock, tmp_path)
    clock.t += 70 * DAY
    result = renew(server, clock, tmp_path, reload_command="sleep 5", reload_timeout=0.05)
    assert result.action == "reissued" and "did not finish" in (result.reload_error or "")


# -- the terminal ------------------------------------------------------------------------


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_only_on_a_terminal(
    server: FakeServer, clock: Clock, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tty = TTY()
    args = ["issue", "--url", URL, "--dir", str(tmp_path), "--name", NAME]
    assert main(args, transport=server, now=clock.now, sleep=clock.sleep, stderr=tty) == 0
    assert "\r\x1b[K waiting for the CA… 0s" in tty.getvalue()
    assert "SANs:" in capsys.readouterr().out
    plain = io.StringIO()
    assert main(args, transport=server, now=clock.now, sleep=clock.sleep, stderr=plain) == 0
    assert "\r" not in plain.getvalue() and "asking for" in plain.getvalue()


def test_terminal_progress_redraws_and_clears() -> None:
    tty = TTY()
    progress = TerminalProgress(tty, interval=3600)
    progress("waiting for the CA")
    progress("waiting for the CA (order accepted)")
    progress("")
    out = tty.getvalue()
    assert out.count("\r\x1b[K") == 3 and out.endswith("\r\x1b[K")
    assert "order accepted" in out


# -- against the real daemon -------------------------------------------------------------


@pytest.fixture
def no_client_log_handlers() -> Iterator[None]:
    yield
    assert not client_log.handlers


@pytest.mark.integration
def test_cli_issue_against_the_daemon(
    daemon: Any, pebble: Any, tmp_path: Path, no_client_log_handlers: None
) -> None:
    from tests.conftest import ZONE

    root = tmp_path / "root.pem"
    root.write_bytes(pebble.root_pem())
    d = tmp_path / "tls"
    name = f"client-cli.{ZONE}"
    argv = ["issue", "--url", daemon.url, "--dir", str(d), "--name", name, "--root", str(root)]
    assert main(argv) == 0
    key = load_key(d / "key.pem")
    chain = x509.load_pem_x509_certificates((d / "cert.pem").read_bytes())
    assert same_key(chain[0], key) and dns_names(chain[0]) == [name]
    assert x509.load_pem_x509_certificates((d / "chain.pem").read_bytes()) == chain[1:]
    state = json.loads((d / "csrproxy.json").read_text())
    assert state["url"] == daemon.url and state["names"] == [name]
    # Again: the same key, and the server's cache answers.
    assert main(argv) == 0
    assert load_key(d / "key.pem").private_numbers() == key.private_numbers()
