"""Asking a running daemon's API from a test thread (urllib: no reactor needed)."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Mapping

from csrproxy.testing.daemon import Csrproxy


def post_sign(
    daemon: Csrproxy,
    body: bytes,
    headers: Mapping[str, str] | None = None,
    timeout: float = 90,
) -> tuple[int, bytes]:
    """``POST /v1/sign`` of ``body``: the status and the body, errors included."""
    req = urllib.request.Request(
        daemon.url + "/v1/sign", data=body, method="POST", headers=dict(headers or {})
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
