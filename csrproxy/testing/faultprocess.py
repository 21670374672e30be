"""The fault proxy (:mod:`csrproxy.testing.faultproxy`) as a child process in front of pebble."""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from csrproxy.testing.faultproxy import Rule
from csrproxy.testing.pebble import Pebble
from csrproxy.testing.processes import Daemon, spawn


@dataclass(eq=False)
class FaultProxyProcess(Daemon):
    """The fault proxy running as a child process, and its control calls."""

    base_url: str = ""  # https://127.0.0.1:PORT
    ca_cert: str = ""

    @property
    def directory(self) -> str:
        return self.base_url + "/dir"

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        ctx = ssl.create_default_context(cafile=self.ca_cert)
        with urllib.request.urlopen(req, context=ctx, timeout=5) as r:
            return json.load(r)

    def counts(self) -> dict[str, int]:
        """Requests seen per ``"METHOD /path-kind"`` (injected ones included)."""
        return dict(self._call("GET", "/_faults/counts")["requests"])

    def injected(self) -> dict[str, int]:
        """Faults injected per ``"METHOD /path-kind ACTION"``."""
        return dict(self._call("GET", "/_faults/counts")["injected"])

    def add_rules(self, rules: Sequence[str | Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Append rules to the plan; returns the whole plan with its counters."""
        return list(self._call("POST", "/_faults/rules", list(rules)))

    def clear_rules(self) -> None:
        self._call("DELETE", "/_faults/rules")

    def reset_counts(self) -> None:
        self._call("POST", "/_faults/reset")


def start_faultproxy(
    workdir: str, pebble: Pebble, rules: Sequence[str] = (), timeout: float = 20
) -> FaultProxyProcess:
    """Run ``python -m csrproxy.testing.faultproxy`` before ``pebble`` on a free loopback port."""
    os.makedirs(workdir, exist_ok=True)
    for r in rules:
        Rule.parse(r)  # fail here, not in the child
    port_file = os.path.join(workdir, "faultproxy.port")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(port_file)
    log_path = os.path.join(workdir, "faultproxy.log")
    upstream = pebble.directory.rsplit("/", 1)[0]
    argv = [
        sys.executable,
        "-m",
        "csrproxy.testing.faultproxy",
        "--upstream",
        upstream,
        "--ca-cert",
        pebble.ca_cert,
        "--cert",
        pebble.cert_path,
        "--key",
        pebble.key_path,
        "--port",
        "0",
        "--port-file",
        port_file,
    ]
    for r in rules:
        argv += ["--rule", r]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
    }
    proc = spawn(argv, log_path, env)
    fp = FaultProxyProcess(log_path=log_path, ca_cert=pebble.ca_cert)

    def ready() -> bool:
        if not fp.base_url:
            with open(port_file) as f:
                port = f.read().strip()
            if not port:
                return False
            fp.base_url = f"https://127.0.0.1:{port}"
        return isinstance(fp._call("GET", "/_faults/counts"), dict)

    fp.adopt(proc, ready, "faultproxy", timeout)
    return fp
