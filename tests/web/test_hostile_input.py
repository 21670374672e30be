"""No 500 from input: hostile bodies, paths and headers sent as raw bytes through the real
LimitedSite and SigningAPI each get a 4xx problem document, and nothing is logged as an
error."""

from __future__ import annotations

import json
from ipaddress import ip_network
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, LogLevel

from csrproxy.web.auth import ClientGate
from csrproxy.web.limits import LimitedSite
from tests.issuance.test_csr_body import signed_request
from tests.support.keys import EC256, make_csr
from tests.web.test_api import ZONE, APITestCase
from tests.web.test_connections import capture_log

PEM = make_csr([f"a.{ZONE}"]).decode()
PUBLIC_PEM = (
    EC256.public_key()
    .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    .decode()
)


def response(raw: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """Status, headers (lower-cased names) and de-chunked body of one HTTP/1.1 response."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    if headers.get(b"transfer-encoding") == b"chunked":
        body = b""
        while True:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            body, rest = body + rest[:n], rest[n + 2 :]
        return status, headers, body
    return status, headers, rest[: int(headers.get(b"content-length", b"0"))]


def post(path: bytes, body: bytes, ctype: bytes | None = b"application/json") -> bytes:
    head = b"POST " + path + b" HTTP/1.1\r\nHost: api.test\r\n"
    if ctype is not None:
        head += b"Content-Type: " + ctype + b"\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


def get(path: bytes, *headers: bytes) -> bytes:
    return (
        b"GET "
        + path
        + b" HTTP/1.1\r\nHost: api.test\r\n"
        + b"".join(h + b"\r\n" for h in headers)
        + b"\r\n"
    )


class HostileInputTests(APITestCase):
    def setUp(self) -> None:
        super().setUp()
        self.events: list[LogEvent] = capture_log(self)

    def site(self) -> LimitedSite:
        # The site's body limit above the API's, so bodies reach the API's parsing.
        return LimitedSite(
            self.api.app.resource(),
            max_body=65536,
            read_timeout=30,
            idle_timeout=60,
            reactor=self.clock,
        )

    def send(self, raw: bytes, peer: str = "127.0.0.1") -> tuple[int, dict[bytes, bytes], bytes]:
        addr = IPv4Address("TCP", peer, 40000)
        proto = self.site().buildProtocol(addr)
        assert proto is not None
        transport = StringTransport(peerAddress=addr, hostAddress=addr)
        proto.makeConnection(transport)
        proto.dataReceived(raw)
        self.clock.advance(0)
        self.assertTrue(transport.value(), raw[:200])
        return response(transport.value())

    def assertProblem(self, raw: bytes, status: int | None = None, kind: str | None = None) -> Any:
        code, headers, body = self.send(raw)
        self.assertTrue(400 <= code < 500, (code, raw[:120], body[:200]))
        if status is not None:
            self.assertEqual(code, status, (raw[:120], body[:200]))
        self.assertEqual(headers.get(b"content-type"), b"application/problem+json", raw[:120])
        doc = json.loads(body)
        self.assertEqual(doc["status"], code)
        self.assertTrue(doc["type"].startswith("https://csrproxy.dev/problems/"), doc)
        if kind is not None:
            self.assertEqual(doc["type"].rsplit("/", 1)[1], kind, (raw[:120], doc))
        return doc

    def assertNothingLogged(self) -> None:
        bad = [
            e
            for e in self.events
            if e.get("log_failure") is not None
            or e.get("isError")
            or e.get("log_level") in (LogLevel.error, LogLevel.critical)
        ]
        self.assertEqual(bad, [])

    def test_deeply_nested_json(self) -> None:
        for body in (
            b"[" * 8000,
            b'{"csr": ' + b"[" * 8000,
            b'{"csr": "x", "a": ' + b"[{" * 4000,
            b'{"a": ' + b'{"a": ' * 33 + b"1" + b"}" * 34,
        ):
            doc = self.assertProblem(post(b"/v1/sign", body), 400, "bad-csr")
            self.assertIn("nested deeper than 32", doc["detail"])
            self.assertProblem(post(b"/v1/name", body, None), 400, "bad-csr")
        # Brackets inside strings are not nesting.
        body = json.dumps({"public_key": PUBLIC_PEM, "note": "[{" * 2000 + '\\"'}).encode()
        code, _, answer = self.send(post(b"/v1/name", body))
        self.assertEqual(code, 200, answer)
        self.assertNothingLogged()

    def test_odd_json(self) -> None:
        bodies = [
            b'{"csr": 1' + b"1" * 5000 + b"}",  # past Python's int-string limit
            b'{"csr": 1e999999}',
            b'{"csr": -0.0e-99999}',
            b'{"csr": NaN}',
            b"[]",
            b"null",
            b'"x"',
            b"1",
            b"true",
            b'{"csr": "\\u0000"}',
            b'{"csr": "\\ud800"}',
            b'{"csr": "\xff\xfe"}',  # not UTF-8
            b'{"csr": "' + PEM.encode().replace(b"\n", b"\\n")[:200] + b'"}',
            b'{"csr": "x", "csr": 5}',  # the last duplicate wins, and is not a string
            '{"csr": 1}'.encode("utf-16"),
            b"{\x00\x00\x00",
            b'{"csr": "' + b"\\" * 4001 + b'"}',
            b"{" + b'"' * 8000,
            b"\x00" * 1000,
            b"{\x00}",
        ]
        for body in bodies:
            self.assertProblem(post(b"/v1/sign", body), 400, "bad-csr")
            self.assertProblem(post(b"/v1/name", body, None))
        self.assertEqual(self.ca.requests["newOrder"], 0)
        self.assertNothingLogged()

    def test_odd_content_types_and_bodies(self) -> None:
        pem = PEM.encode()
        cases = [
            (pem, b"application/json"),  # PEM declared as JSON
            (json.dumps({"csr": PEM}).encode()[1:], b"application/json"),
            (b"a=b&c=d", b"application/x-www-form-urlencoded"),
            (
                b"--x\r\nContent-Disposition: form-data; name=csr\r\n\r\nz\r\n--x--",
                b"multipart/form-data; boundary=x",
            ),
            (b"\xff\xfe\x00", b"\xff\xfe"),
            (b"hello", b"text/html; charset=\xff"),
            (pem.replace(b"MII", b"\x00II"), b"application/pkcs10"),
            (b"-----BEGIN CERTIFICATE REQUEST-----\n\xff\n-----END CERTIFICATE REQUEST-----", None),
            (b"\x30\x82\xff\xff" + b"\x00" * 100, b"application/pkcs10"),
            (b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----", None),
        ]
        for body, ctype in cases:
            self.assertProblem(post(b"/v1/sign", body, ctype), 400)
            self.assertProblem(post(b"/v1/name", body, ctype), 400)
        self.assertNothingLogged()

    def test_csr_with_a_duplicate_extension(self) -> None:
        pem = make_csr(
            [f"a.{ZONE}"], extensions=[(x509.BasicConstraints(ca=False, path_length=None), False)]
        )
        info = x509.load_pem_x509_csr(pem).tbs_certrequest_bytes
        der = signed_request(info.replace(bytes.fromhex("0603551d13"), bytes.fromhex("0603551d11")))
        self.assertProblem(post(b"/v1/sign", der, b"application/pkcs10"), 400, "bad-csr")
        self.assertNothingLogged()

    def test_paths_that_are_not_utf8(self) -> None:
        for path in (
            b"/%FF%FE",
            b"/v1/orders/%FF",
            b"/v1/orders/%C0%AF",  # overlong
            b"/v1/orders/%ED%A0%80",  # a surrogate
            b"/v1/certificates/%E2%82",  # truncated
        ):
            for _ in range(3):
                doc = self.assertProblem(get(path), 400, "bad-request")
                self.assertIn("not UTF-8", doc["detail"])
        self.assertProblem(get(b"/\xff"), 400, "bad-request")  # twisted.web's own check
        self.assertProblem(get(b"/v1/health", b"Host: \xff\xfe"), 400, "bad-request")
        self.assertNothingLogged()

    def test_other_odd_paths(self) -> None:
        for path in (
            b"/v1/orders/%00",
            b"/v1/orders/" + b"a" * 8000,
            b"/v1/certificates/..%2F..%2Fetc%2Fpasswd",
            b"/v1/orders/%",
            b"/v1/orders/%zz",
            b"/v1/orders/\xe2\x98\x83",
            b"//v1//health",
            b"http://other.test/v1/orders/x",
            b"/v1/sign?" + b"%ff" * 1000,
        ):
            self.assertProblem(get(path))
        self.assertNothingLogged()

    def test_odd_headers(self) -> None:
        csr = post(b"/v1/sign", b"nonsense")
        for raw in (
            csr.replace(
                b"Host: api.test\r\n", b"Host: api.test\r\nPrefer: \xff;;==,,respond-async=\xff\r\n"
            ),
            csr.replace(b"Host: api.test\r\n", b"Host: api.test\r\nAuthorization: \xff\xfe\r\n"),
            csr.replace(b"Host: api.test\r\n", b"Host: api.test\r\nX-Forwarded-For: \xff\r\n"),
            csr.replace(b"Host: api.test\r\n", b""),  # no Host
            csr.replace(b"Host: api.test", b"Host: api.test:99999999999999"),
            csr.replace(b"Host: api.test", b"Host: [::1"),
            csr.replace(b"Host: api.test\r\n", b"Host: api.test\r\nX-A: a\x00b\r\n"),
            csr.replace(b"Host: api.test\r\n", b"Host: api.test\r\nX-A: \x7f\x01\r\n"),
            csr.replace(b"Host: api.test\r\n", b"Host: api.test\r\n" + b"X: y\r\n" * 600),
            csr.replace(b"Content-Length: 8", b"Content-Length: +8"),
            csr.replace(b"Content-Length: 8", b"Content-Length: -8"),
            csr.replace(b"Content-Length: 8", b"Content-Length: 8\r\nContent-Length: 9"),
            csr.replace(b"Content-Length: 8", b"Transfer-Encoding: gzip, chunked"),
            csr.replace(b"POST", b"P\xffST"),
            csr.replace(b"POST", b"post"),
            csr.replace(b"HTTP/1.1", b"HTTP/1.1 extra"),
        ):
            self.assertProblem(raw)
        self.assertNothingLogged()

    def test_tokens_with_odd_bytes(self) -> None:
        from csrproxy.web.auth import parse_tokens, token_hash

        self.build(gate=ClientGate(parse_tokens(token_hash("secret"))))
        for auth in (b"Bearer \xff\xfe", b"Bearer \x80", b"\xff secret", b"Bearer " + b"a" * 10000):
            raw = get(b"/v1/orders/x", b"Authorization: " + auth)
            self.assertProblem(raw)
        self.assertNothingLogged()


class ForwardedForTests(APITestCase):
    """The X-Forwarded-For shapes a proxy may pass on, through the real API."""

    def setUp(self) -> None:
        super().setUp()
        self.build(
            gate=ClientGate(
                allow_from=[ip_network("192.0.2.0/24")],
                trusted_proxies=[ip_network("127.0.0.1")],
            )
        )

    def test_unparsable_nearest_hop_is_refused_not_taken_for_the_proxy(self) -> None:
        for value in ("10.1.2.3:4444", "192.0.2.7:4444", "unknown", "", "garbage", "192.0.2.7, "):
            code, headers, body = self.request("GET", "/v1/orders/nope", X_Forwarded_For=value)
            self.assertEqual(code, 400, (value, body))
            doc = self.problem(code, headers, body)
            self.assertIn("X-Forwarded-For", doc["detail"])
        self.assertIn(
            'csrproxy_admission_refusals_total{reason="bad-request"} 6.0',
            self.metrics.render().decode(),
        )
        # A parsable one is the client: inside allow_from, or refused as outside it.
        self.assertEqual(
            self.request("GET", "/v1/orders/nope", X_Forwarded_For="192.0.2.7")[0], 404
        )
        self.assertEqual(self.request("GET", "/v1/orders/nope", X_Forwarded_For="10.1.2.3")[0], 403)
        # The proxy's own request (no header) is the proxy's.
        self.assertEqual(self.request("GET", "/v1/orders/nope")[0], 403)

    def test_sign_refused_too(self) -> None:
        code, headers, body = self.post(make_csr([f"a.{ZONE}"]), X_Forwarded_For="unknown")
        self.assertEqual(code, 400)
        self.problem(code, headers, body)
        self.assertEqual(self.ca.requests["newOrder"], 0)
