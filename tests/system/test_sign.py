"""The signing API end to end: twistd csrproxy against real pebble."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from csrproxy.client import obtain_certificate
from csrproxy.testing.daemon import Csrproxy, start_csrproxy
from csrproxy.testing.pebble import Pebble
from csrproxy.web.auth import token_hash
from tests.conftest import ZONE
from tests.support.keys import RSA1024, make_csr, tamper

pytestmark = pytest.mark.integration

TOKEN = "integration-token"
NO_BUDGETS = {
    "new_names_per_week": 0,
    "orders_per_3h": 0,
    "same_names_per_week": 0,
    "client_requests_per_hour": 0,
}


@pytest.fixture(scope="module")
def signer(
    tmp_path_factory: pytest.TempPathFactory, pebble: Pebble, dns_port: int
) -> Iterator[Csrproxy]:
    work = tmp_path_factory.mktemp("signer")
    tokens = work / "tokens"
    tokens.write_text(f"{token_hash(TOKEN)}\n")
    overrides: dict[str, dict[str, Any]] = {
        "acme": {"poll_interval": 0.005, "poll_max": 0.5},
        "api": {"tokens_file": str(tokens), "max_body": 16384},
        "policy": {"names": [f"{{label}}.{ZONE}", f"{{key}}.{ZONE}"], **NO_BUDGETS},
    }
    with start_csrproxy(str(work), pebble, dns_port, ZONE, overrides=overrides) as d:
        yield d


def call(
    daemon: Csrproxy,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    token: str | None = TOKEN,
) -> tuple[int, dict[str, str], bytes]:
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(daemon.url + path, data=body, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def problem(code: int, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    assert headers["Content-Type"] == "application/problem+json", (code, body)
    doc: dict[str, Any] = json.loads(body)
    assert doc["status"] == code
    assert doc["type"].startswith("https://csrproxy.dev/problems/")
    return doc


def test_fifty_csrs_at_concurrency_ten(signer: Csrproxy, pebble: Pebble) -> None:
    root = pebble.root_pem()
    names = [f"load{i}.{ZONE}" for i in range(50)]
    csrs = [make_csr([n], key=_key()) for n in names]

    def sign(csr: bytes) -> tuple[int, bytes]:
        code, _, body = call(signer, "POST", "/v1/sign", csr)
        return code, body

    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(sign, csrs))
    assert [code for code, _ in results] == [200] * 50, [b[:200] for c, b in results if c != 200]
    for name, (_, body) in zip(names, results, strict=True):
        chain = x509.load_pem_x509_certificates(body)
        sans = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == [name]
        chain[-1].verify_directly_issued_by(x509.load_pem_x509_certificate(root))


def _key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def test_async_order(signer: Csrproxy) -> None:
    code, headers, body = call(
        signer, "POST", "/v1/sign", make_csr([f"async.{ZONE}"]), {"Prefer": "respond-async"}
    )
    assert code == 202, body
    location = headers["Location"]
    assert location.startswith("/v1/orders/")
    doc: dict[str, Any] = {}
    for _ in range(600):
        doc = json.loads(call(signer, "GET", location)[2])
        if doc["status"] != "processing":
            break
        _pause(0.05)
    assert doc["status"] == "valid", doc
    code, headers, body = call(signer, "GET", location + "/certificate")
    assert code == 200
    assert headers["Content-Type"] == "application/pem-certificate-chain"
    code, headers, body = call(signer, "GET", "/v1/orders/" + "x" * 22)
    assert problem(code, headers, body)["type"].endswith("/not-found")


def _pause(seconds: float) -> None:
    import threading

    threading.Event().wait(seconds)


def test_second_post_gets_the_stored_chain(signer: Csrproxy) -> None:
    csr = make_csr([f"again.{ZONE}"], key=_key())
    first = call(signer, "POST", "/v1/sign", csr)
    second = call(signer, "POST", "/v1/sign", csr)
    assert first[0] == second[0] == 200
    assert first[2] == second[2]


def test_token_required(signer: Csrproxy) -> None:
    for token in (None, "wrong"):
        code, headers, body = call(signer, "POST", "/v1/sign", make_csr([f"t.{ZONE}"]), None, token)
        assert code == 401
        assert problem(code, headers, body)["type"].endswith("/unauthorized")


def test_huge_content_length_refused_before_100_continue(signer: Csrproxy) -> None:
    host, port = signer.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(
            b"POST /v1/sign HTTP/1.1\r\nHost: x\r\nContent-Length: 1099511627776\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert b"100 Continue" not in answer
    assert b"application/problem+json" in answer


def test_bad_input_matrix_then_still_signs(signer: Csrproxy, tmp_path: Path) -> None:
    bad: list[tuple[str, str, bytes | None, int]] = [
        ("POST", "/v1/sign", b"", 400),
        ("POST", "/v1/sign", b"not a csr", 400),
        ("POST", "/v1/sign", b'{"csr": 1}', 400),
        ("POST", "/v1/sign", tamper(make_csr([f"a.{ZONE}"])), 400),
        ("POST", "/v1/sign", make_csr([f"a.{ZONE}"], RSA1024), 403),
        ("POST", "/v1/sign", make_csr(["www.example.org"]), 403),
        ("POST", "/v1/sign", b"x" * 20000, 413),
        ("GET", "/v1/sign", None, 405),
        ("PUT", "/v1/health", b"x", 405),
        ("GET", "/nowhere", None, 404),
        ("GET", "/v1/orders/abc/certificate", None, 404),
        ("GET", "/v1/name", b"garbage", 400),
    ]
    for method, path, body, status in bad:
        code, headers, content = call(signer, method, path, body)
        assert code == status, (method, path, content)
        problem(code, headers, content)
    # Still signs, and the client finds its own name through GET /v1/name.
    result = _obtain(signer, tmp_path)
    label = result.names[0].split(".")[0]
    assert len(label) == 32


def _obtain(signer: Csrproxy, tmp_path: Path) -> Any:
    """The stock client with the token (the test daemon listens on plain http: --insecure)."""
    return obtain_certificate(signer.url, tmp_path, [], token=TOKEN, insecure=True)


def test_name_for_a_public_key(signer: Csrproxy) -> None:
    key = _key()
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    code, _, body = call(signer, "GET", "/v1/name", pem)
    assert code == 200
    names = json.loads(body)["names"]
    assert names[0] == f"{{label}}.{ZONE}"
    assert names[1].endswith("." + ZONE) and len(names[1].split(".")[0]) == 32


def test_health_and_metrics(signer: Csrproxy) -> None:
    code, _, body = call(signer, "GET", "/v1/health", token=None)
    doc = json.loads(body)
    assert code == 200 and doc["ready"] and doc["live"]
    assert set(doc["checks"]) >= {"account", "api", "dns", "store"}
    assert all(part["ok"] for part in doc["checks"].values()), doc
    assert call(signer, "GET", "/v1/health/live", token=None)[0] == 200
    text = call(signer, "GET", "/metrics")[2].decode()
    assert 'csrproxy_ready{check="store"} 1.0' in text
    for family in (
        "csrproxy_http_requests_total",
        "csrproxy_orders_total",
        "csrproxy_issuance_seconds_bucket",
        "csrproxy_acme_requests_total",
        "csrproxy_orders_in_flight",
        "csrproxy_dns_queries_total",
        "csrproxy_admission_refusals_total",
    ):
        assert family in text, family
