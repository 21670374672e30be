"""A Knot DNS secondary (Debian ``knot``) of csrproxy's zone, on a free loopback port.

``knotd`` runs as the current user with its own configuration, run and storage
directories under ``workdir``; it takes the zone from csrproxy by zone transfer with a
TSIG key (HMAC-SHA256) and accepts csrproxy's NOTIFY signed with that key. Started once it
answers queries (SERVFAIL until it has the zone: start it before csrproxy, as secondaries
run, and csrproxy's NOTIFY at start makes it transfer at once); ``wait_serving`` waits for
the zone.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from csrproxy.testing.dnsquery import dns_query
from csrproxy.testing.ports import free_udp_tcp_port
from csrproxy.testing.processes import Daemon, log_tail, retrying, spawn

KNOTD = "/usr/sbin/knotd"
TSIG_NAME = "csrproxy-xfr"


def available() -> bool:
    """True when ``knotd`` is installed."""
    return os.access(KNOTD, os.X_OK)


@dataclass(eq=False)
class Knot(Daemon):
    port: int = 0
    zone: str = ""
    tsig_secret: str = ""  # base64
    #: Every zone it carries (``zone`` first).
    zones: tuple[str, ...] = ()

    @property
    def dns_server(self) -> str:
        """``127.0.0.1:PORT``, as pebble's ``-dnsserver`` wants it."""
        return f"127.0.0.1:{self.port}"

    def wait_serving(self, timeout: float = 20) -> None:
        """Wait until Knot serves every zone (its first transfers are done)."""
        pause = threading.Event()
        deadline = time.monotonic() + timeout
        waiting = list(self.zones or (self.zone,))
        while waiting and time.monotonic() < deadline:
            with contextlib.suppress(OSError, EOFError, ValueError):
                rcode, soa = dns_query(self.port, waiting[0], "SOA", timeout=0.5)
                if rcode == 0 and soa:
                    waiting.pop(0)
                    continue
            pause.wait(0.05)
        if waiting:
            raise RuntimeError(f"knotd does not serve {waiting[0]}:\n{log_tail(self.log_path)}")

    def secondary_config(self) -> dict[str, object]:
        """The ``[[dns.secondaries]]`` table csrproxy needs for this secondary."""
        return {
            "address": "127.0.0.1",
            "notify_port": self.port,
            "tsig_name": TSIG_NAME,
            "tsig_secret": self.tsig_secret,
        }


def secondary_port() -> int:
    """A free loopback port for a Knot started later (csrproxy's config names it first)."""
    return free_udp_tcp_port()


def start_knot(
    workdir: str,
    zone: str,
    primary: str,
    *,
    port: int = 0,
    tsig_secret: str | None = None,
    timeout: float = 20,
    also: Sequence[str] = (),
) -> Knot:
    """Start ``knotd`` as a secondary of ``zone`` (and of the zones in ``also``) from
    ``primary`` (``host:port``, which need not answer yet)."""
    secret = tsig_secret or base64.b64encode(os.urandom(32)).decode()
    zones = tuple(z.rstrip(".") for z in (zone, *also))
    return retrying(lambda: _start(workdir, zones, primary, port, secret, timeout))


def _start(
    workdir: str, zones: tuple[str, ...], primary: str, port: int, secret: str, timeout: float
) -> Knot:
    zone = zones[0]
    root = os.path.abspath(os.path.join(workdir, "knot"))
    shutil.rmtree(root, ignore_errors=True)
    for sub in ("run", "db", "zones"):
        os.makedirs(os.path.join(root, sub))
    port = port or free_udp_tcp_port()
    host, _, primary_port = primary.rpartition(":")
    conf = f"""\
server:
    rundir: "{root}/run"
    listen: 127.0.0.1@{port}
    tcp-reuseport: off

database:
    storage: "{root}/db"

log:
  - target: stderr
    any: info

key:
  - id: {TSIG_NAME}
    algorithm: hmac-sha256
    secret: {secret}

remote:
  - id: primary
    address: {host}@{primary_port}
    key: {TSIG_NAME}

acl:
  - id: notify-from-primary
    address: {host}
    key: {TSIG_NAME}
    action: notify

zone:
"""
    for each in zones:
        conf += f"""\
  - domain: {each}
    storage: "{root}/zones"
    master: primary
    acl: notify-from-primary
    zonefile-sync: -1
    zonefile-load: none
    journal-content: none
"""
    path = os.path.join(root, "knot.conf")
    with open(path, "w") as f:
        f.write(conf)
    log_path = os.path.join(workdir, "knot.log")
    knot = Knot(log_path, port=port, zone=zone, tsig_secret=secret, zones=zones)

    def ready() -> bool:  # it answers (SERVFAIL until its first transfer)
        dns_query(port, zone, "SOA", timeout=0.5)
        return True

    proc = spawn([KNOTD, "-c", path], log_path)
    knot.adopt(proc, ready, "knotd", timeout)
    return knot
