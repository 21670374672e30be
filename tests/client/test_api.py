"""The conversation with csrproxy: the async fallback and its polling, deadlines, retries
after 429 and network errors, the certificate id; a fake server and clock, no sleeps."""

from __future__ import annotations

from pathlib import Path

import pytest

from csrproxy.client import ClientError, obtain_certificate
from csrproxy.client.api import certificate_ref
from csrproxy.client.chains import dns_names
from csrproxy.client.transport import Request, Response
from tests.client.fakes import NAME, T0, URL, FakeClock, FakeServer, cli, obtain, problem


def test_async_fallback_polls_with_retry_after(
    server: FakeServer, clock: FakeClock, tmp_path: Path
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


def test_polling_gives_up_at_the_deadline(
    server: FakeServer, clock: FakeClock, tmp_path: Path
) -> None:
    server.async_polls = 10**6
    with pytest.raises(ClientError) as e:
        obtain(server, clock, tmp_path, timeout=30)
    assert e.value.exit_code == 3
    assert clock.t - T0 <= 30
    assert not (tmp_path / "cert.pem").exists()


def test_network_errors_while_polling_are_retried(
    server: FakeServer, clock: FakeClock, tmp_path: Path
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
    server: FakeServer, clock: FakeClock, tmp_path: Path
) -> None:
    server.canned["POST /v1/sign"] = [problem(429, "rate-limited", {"retry-after": "20"})]
    obtain(server, clock, tmp_path)
    assert clock.sleeps == [20.0] and server.posts() == 2


def test_rate_limited_past_the_deadline_is_refused(
    server: FakeServer, clock: FakeClock, tmp_path: Path
) -> None:
    server.canned["POST /v1/sign"] = [problem(429, "rate-limited", {"retry-after": "3600"})]
    code, err = cli(server, clock, "issue", "--url", URL, "--dir", str(tmp_path), "--name", NAME)
    assert code == 1 and "retry after" in err and clock.sleeps == []


def test_ca_unavailable_is_retried_after_retry_after(
    server: FakeServer, clock: FakeClock, tmp_path: Path
) -> None:
    server.canned["POST /v1/sign"] = [problem(503, "ca-error", {"retry-after": "10"})]
    obtain(server, clock, tmp_path)
    assert clock.sleeps == [10.0] and server.posts() == 2


def test_ca_unavailable_past_the_deadline_is_refused(
    server: FakeServer, clock: FakeClock, tmp_path: Path
) -> None:
    server.canned["POST /v1/sign"] = [problem(503, "ca-error", {"retry-after": "3600"})]
    code, err = cli(server, clock, "issue", "--url", URL, "--dir", str(tmp_path), "--name", NAME)
    assert code == 1 and "retry after" in err and clock.sleeps == []


def test_link_header_alone_gives_the_certificate_id() -> None:
    resp = Response(
        200, {"link": '<https://x.test/v1/certificates/abc>; rel="csrproxy-certificate"'}
    )
    assert certificate_ref(resp, URL) == ("abc", "https://x.test/v1/certificates/abc")
    resp = Response(200, {"csrproxy-certificate-id": "a/b"})
    assert certificate_ref(resp, URL) == ("a/b", f"{URL}/v1/certificates/a%2Fb")
    assert certificate_ref(Response(200, {}), URL) == (None, None)
