"""Throwaway TLS files for loopback HTTPS servers in tests, made once per test run."""

from __future__ import annotations

import tempfile

from csrproxy.testing.tls import make_tls_files

_TLS_DIR = tempfile.TemporaryDirectory(prefix="csrproxy-test-tls-")
#: The servers' CA and a certificate for 127.0.0.1 (and ::1, localhost) with its key.
CA, _, CERT, KEY = make_tls_files(f"{_TLS_DIR.name}/good")
#: Another CA nobody trusts, and a certificate from it.
OTHER_CA, _, OTHER_CERT, OTHER_KEY = make_tls_files(f"{_TLS_DIR.name}/other")
#: A CA and a certificate from it for a name the clients never ask for.
NAME_CA, _, NAME_CERT, NAME_KEY = make_tls_files(
    f"{_TLS_DIR.name}/name", hosts=("elsewhere.example",)
)
