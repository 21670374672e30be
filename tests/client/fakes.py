"""What the client tests run against: a throwaway CA, a fake clock, csrproxy's API as a
fake transport (:class:`FakeServer`), a real HTTP server on loopback
(:class:`LoopbackHTTP`), and the calls that drive the client with them."""

from __future__ import annotations

import base64
import datetime
import hashlib
import io
import json
import re
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from csrproxy.client import (
    ClientError,
    Obtained,
    RenewResult,
    main,
    obtain_certificate,
    renew_if_due,
)
from csrproxy.client.chains import pem_of
from csrproxy.client.transport import Request, Response

ZONE_T = "go.example.test"
DAY = 86400.0
T0 = 1_800_000_000.0  # 2027-01-15
URL = "http://csrproxy.test"
HTTPS_URL = "https://csrproxy.test"
NAME = f"host1.{ZONE_T}"


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
class FakeClock:
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

    def __init__(self, ca: CA, clock: FakeClock) -> None:
        self.ca, self.clock = ca, clock
        self.requests: list[Request] = []
        self.days = 90.0
        self.async_polls: int | None = None  # 202 then this many "processing" polls
        self.orders: dict[str, list[Any]] = {}
        self.chains: dict[str, bytes] = {}  # certificate id -> newest chain
        self.ids: dict[bytes, str] = {}  # SPKI + names -> certificate id
        self.canned: dict[str, list[Response]] = {}  # "POST /v1/sign" -> answers, in turn
        self.chain_headers: dict[str, str] = {}  # added to (or replacing) a chain's headers
        self.down = False
        self.zones = [ZONE_T]  # GET /v1/name: the zones, and those without room
        self.full: set[str] = set()

    def __call__(self, req: Request) -> Response:
        self.requests.append(req)
        path = req.url.removeprefix(URL).removeprefix(HTTPS_URL)
        if self.down:
            raise ClientError(f"cannot reach {req.url}: connection refused", 3)
        queue = self.canned.get(f"{req.method} {path}")
        if queue:
            return queue.pop(0)
        if req.method == "POST" and path == "/v1/sign":
            return self.sign(req)
        if path.partition("?")[0] == "/v1/name":
            label = label_of(req.body or b"")
            current = urllib.parse.parse_qs(path.partition("?")[2]).get("current", [])
            # As csrproxy with [dns] zones: the current names while this key's, else the
            # key's name in the first zone with room.
            if current and all(n in [f"{label}.{z}" for z in self.zones] for n in current):
                names = current
            else:
                zone = next((z for z in self.zones if z not in self.full), self.zones[0])
                names = [f"{{label}}.{zone}", f"{label}.{zone}"]
            doc = {"names": names, "key_label": label}
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
            **self.chain_headers,
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


def obtain(
    server: FakeServer, clock: FakeClock, d: Path, names: list[str] | None = None, **kw: Any
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


def renew(server: FakeServer, clock: FakeClock, d: Path, **kw: Any) -> RenewResult:
    return renew_if_due(d, now=clock.now, sleep=clock.sleep, transport=server, **kw)


def cli(server: FakeServer, clock: FakeClock, *argv: str) -> tuple[int, str]:
    err = io.StringIO()
    code = main(list(argv), transport=server, now=clock.now, sleep=clock.sleep, stderr=err)
    return code, err.getvalue()


def leaf_of(d: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificates((d / "cert.pem").read_bytes())[0]


def key_bytes(d: Path) -> bytes:
    return (d / "key.pem").read_bytes()


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@dataclass
class Seen:
    """One request a :class:`LoopbackHTTP` received."""

    method: str
    path: str
    headers: dict[str, str]  # names lowercased


Answer = tuple[int, dict[str, str], bytes]


class LoopbackHTTP:
    """A real HTTP server on 127.0.0.1 (a free port) that answers every request with
    ``answer(method, path)`` and records what it was asked in :attr:`seen`."""

    def __init__(self, answer: Callable[[str, str], Answer]) -> None:
        self.seen: list[Seen] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def handle_one(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                outer.seen.append(
                    Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()})
                )
                status, headers, body = answer(self.command, self.path)
                self.send_response(status)
                for k, v in {**headers, "content-length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = handle_one

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.01,))

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.thread.join(10)
        self.httpd.server_close()


@contextmanager
def loopback_http(answer: Callable[[str, str], Answer]) -> Iterator[LoopbackHTTP]:
    server = LoopbackHTTP(answer)
    server.start()
    try:
        yield server
    finally:
        server.stop()
