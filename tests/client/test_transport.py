"""The urllib transport against a real server on loopback: HTTP errors are answers, a
redirect is an answer and is never followed, failures to connect are EXIT_NETWORK."""

from __future__ import annotations

import socket

import pytest

from csrproxy.client import ClientError
from csrproxy.client.transport import MAX_BODY, Request, UrllibTransport
from tests.client.fakes import Answer, loopback_http


def test_a_refused_connection_is_exit_3() -> None:
    with socket.socket() as s:  # a port nobody listens on any more
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ClientError) as e:
        UrllibTransport()(Request("GET", f"http://127.0.0.1:{port}/v1/health", {}))
    assert e.value.exit_code == 3 and "refused" in str(e.value).lower()


def test_http_errors_are_answers() -> None:
    def answer(method: str, path: str) -> Answer:
        return 429, {"Retry-After": "7"}, b"{}"

    with loopback_http(answer) as server:
        resp = UrllibTransport()(Request("POST", server.url + "/v1/sign", {}, b"csr"))
    assert resp.status == 429 and resp.header("Retry-After") == "7" and resp.body == b"{}"


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_a_redirect_is_an_answer_and_is_not_followed(method: str, status: int) -> None:
    with (
        loopback_http(lambda m, p: (200, {}, b"stolen")) as elsewhere,
        loopback_http(lambda m, p: (status, {"Location": elsewhere.url + "/x"}, b"")) as server,
    ):
        headers = {"Authorization": "Bearer s3cret"}
        resp = UrllibTransport()(Request(method, server.url + "/v1/sign", headers, b"csr"))
    assert resp.status == status and resp.header("location") == elsewhere.url + "/x"
    assert server.seen[0].headers["authorization"] == "Bearer s3cret"
    assert elsewhere.seen == []


def test_an_answer_past_the_bound_is_refused() -> None:
    with (
        loopback_http(lambda m, p: (200, {}, b"x" * (MAX_BODY + 1))) as server,
        pytest.raises(ClientError) as e,
    ):
        UrllibTransport()(Request("GET", server.url + "/v1/certificates/a", {}))
    assert e.value.exit_code == 1 and "more than" in str(e.value)
