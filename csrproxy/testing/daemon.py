"""Run ``twistd -n csrproxy`` as a child process on free loopback ports.

Used by ``make demo``, the integration tests and ``bench/``: it writes a
configuration for a given pebble, starts the daemon and waits until
``/v1/health`` says it is ready.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

from csrproxy.testing.pebble import Pebble
from csrproxy.testing.ports import free_port
from csrproxy.testing.processes import log_tail, terminate


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):  # an inline table ([[x]] tables as a list of them)
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """A TOML document for nested tables of simple values."""
    out = []
    for name, table in sections.items():
        out.append(f"[{name}]")
        out.extend(f"{k} = {toml_value(v)}" for k, v in table.items())
        out.append("")
    return "\n".join(out)


def demo_config(
    workdir: Path, pebble: Pebble, dns_port: int, zone: str, api_port: int
) -> dict[str, dict[str, Any]]:
    return {
        "acme": {
            "directory": pebble.directory,
            "contact": [f"mailto:hostmaster@{zone}"],
            "ca_certs": pebble.ca_cert,
            "poll_interval": 0.01,
            "poll_max": 1.0,
            "order_timeout": 60,
        },
        "api": {"listen": [f"tcp:{api_port}:interface=127.0.0.1"]},
        "dns": {
            "zone": zone,
            "listen": [f"127.0.0.1:{dns_port}"],
            "nameservers": [f"ns1.{zone}"],
            "records": ["@ A 127.0.0.1", "ns1 A 127.0.0.1", "* A 127.0.0.1"],
        },
        "policy": {"names": [f"{{label}}.{zone}"]},
        "state": {"dir": str(workdir / "state")},
    }


class Csrproxy:
    """A running ``twistd -n csrproxy``."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, config: Path, log: Path) -> None:
        self.proc = proc
        self.url = url
        self.config = config
        self.log = log

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(str(self.log), lines)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s.  Idempotent."""
        terminate(self.proc, grace=10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def twistd_argv(config: Path) -> list[str]:
    twistd = Path(sys.executable).with_name("twistd")
    return [str(twistd), "-n", "--pidfile=", "csrproxy", "--config", str(config)]


def same_code() -> dict[str, str]:
    """``PYTHONPATH`` putting first the tree this csrproxy was imported from: the daemon runs
    the tests' code, whichever csrproxy the venv has installed (a second checkout, a
    worktree)."""
    source = str(Path(__file__).resolve().parents[2])
    return {"PYTHONPATH": os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH")) if p)}


def start_csrproxy(
    workdir: str,
    pebble: Pebble,
    dns_port: int,
    zone: str,
    *,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    extra_argv: Sequence[str] = (),
    timeout: float = 30,
    env: Mapping[str, str] | None = None,
) -> Csrproxy:
    """Write a config for ``pebble`` and start the daemon; wait until it is ready."""
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    api_port = free_port()
    config = demo_config(work, pebble, dns_port, zone, api_port)
    for section, values in (overrides or {}).items():
        config.setdefault(section, {}).update(values)
    path = work / "csrproxy.toml"
    path.write_text(to_toml(config))
    log = work / "csrproxy.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [*twistd_argv(path), *extra_argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=work,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **same_code(), **(env or {})},
        )
    url = f"http://127.0.0.1:{api_port}"
    daemon = Csrproxy(proc, url, path, log)
    if not wait_ready(daemon, timeout):
        daemon.stop()
        raise RuntimeError(f"csrproxy did not become ready in {timeout}s:\n{daemon.log_tail()}")
    return daemon


def wait_ready(daemon: Csrproxy, timeout: float) -> bool:
    """Poll ``/v1/health`` until it answers 200, the process exits, or ``timeout`` passes."""
    pause = threading.Event()
    deadline = _now() + timeout
    while _now() < deadline:
        if daemon.proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(daemon.url + "/v1/health", timeout=2) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        pause.wait(0.05)
    return False


def _now() -> float:
    import time

    return time.monotonic()
