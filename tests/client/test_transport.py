"""The urllib transport: HTTP errors are answers, failures to connect EXIT_NETWORK."""

from __future__ import annotations

import io
from typing import Any

import pytest

from csrproxy.client import ClientError
from csrproxy.client.transport import Request, UrllibTransport
from tests.client.fakes import URL


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
