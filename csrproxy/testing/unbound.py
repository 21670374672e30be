"""A validating Unbound resolver (Debian ``unbound``) in front of test zones, on a free
loopback port: what a CA's validator asks, hardened the way Let's Encrypt's is.

0x20 (``use-caps-for-id``), strict QNAME minimisation, ``harden-below-nxdomain``, a
1232-byte EDNS buffer, TTLs capped at 60 s, and the validator on with the root trust
anchor (``/usr/share/dns/root.key``, Debian ``dns-root-data``) when it is there. Each
zone is a ``stub-zone`` to a server on loopback (csrproxy's DNS, PowerDNS) and
``domain-insecure`` (the test zones are unsigned and have no parent). Unbound sends only
from 127.0.0.1, so it never leaves loopback. It runs as the current user, not chrooted,
with everything under ``workdir``.

Started once it answers (``localhost.`` from its own data, so that no failure towards a
stub that is not up yet is cached); ``wait_serving`` waits until a zone resolves.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from csrproxy.testing.dnsquery import dns_query
from csrproxy.testing.ports import free_udp_tcp_port
from csrproxy.testing.processes import Daemon, log_tail, retrying, spawn

UNBOUND = "/usr/sbin/unbound"
ROOT_KEY = "/usr/share/dns/root.key"
CACHE_MAX_TTL = 60  # Let's Encrypt's cap


def available() -> bool:
    """True when ``unbound`` is installed."""
    return os.access(UNBOUND, os.X_OK)


@dataclass(eq=False)
class Unbound(Daemon):
    port: int = 0
    stubs: dict[str, str] = field(default_factory=dict)  # zone -> host:port
    config_path: str = ""

    @property
    def dns_server(self) -> str:
        """``127.0.0.1:PORT``, as pebble's ``-dnsserver`` wants it."""
        return f"127.0.0.1:{self.port}"

    def query(self, name: str, qtype: str = "TXT") -> tuple[int, list[bytes]]:
        """One recursive query through Unbound (see ``dns_query``)."""
        return dns_query(self.port, name, qtype)

    def wait_serving(self, zone: str | None = None, timeout: float = 20) -> None:
        """Wait until the SOA of ``zone`` (each stub zone by default) resolves through
        Unbound. Call it once the stub's server answers: Unbound caches a failure."""
        import dns.exception

        zones = [zone.rstrip(".")] if zone else list(self.stubs)
        pause = threading.Event()
        deadline = time.monotonic() + timeout
        for z in zones:
            while True:
                with contextlib.suppress(OSError, EOFError, ValueError, dns.exception.DNSException):
                    rcode, soa = self.query(z, "SOA")
                    if rcode == 0 and soa:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"unbound does not resolve {z}:\n{log_tail(self.log_path)}")
                pause.wait(0.05)


def unbound_config(
    root: str, port: int, stubs: Mapping[str, str], log_path: str, trust_anchor: str | None
) -> str:
    """The ``unbound.conf`` text for ``start_unbound`` (zones without the trailing dot)."""
    zones = list(stubs)
    # RFC 6761 names (test., invalid., ...) are local zones by default: Unbound answers
    # them itself unless told not to.
    tlds = sorted({z.rsplit(".", 1)[-1] for z in zones})
    lines = [
        "server:",
        "    interface: 127.0.0.1",
        f"    port: {port}",
        "    outgoing-interface: 127.0.0.1",
        "    do-ip6: no",
        "    so-reuseport: no",
        "    num-threads: 1",
        '    username: ""',
        '    chroot: ""',
        f'    directory: "{root}"',
        f'    pidfile: "{root}/unbound.pid"',
        "    use-syslog: no",
        f'    logfile: "{log_path}"',
        "    log-time-ascii: yes",
        "    log-servfail: yes",
        "    log-replies: yes",
        "    verbosity: 1",
        "    access-control: 127.0.0.0/8 allow",
        "    use-caps-for-id: yes",
        "    qname-minimisation: yes",
        "    qname-minimisation-strict: yes",
        "    harden-below-nxdomain: yes",
        "    edns-buffer-size: 1232",
        "    do-not-query-localhost: no",
        f"    cache-max-ttl: {CACHE_MAX_TTL}",
        '    module-config: "validator iterator"',
    ]
    if trust_anchor:
        lines.append(f'    trust-anchor-file: "{trust_anchor}"')
    lines += [f'    local-zone: "{tld}." nodefault' for tld in tlds]
    lines += [f'    domain-insecure: "{z}."' for z in zones]
    for z, server in stubs.items():
        host, _, sport = server.rpartition(":")
        lines += ["", "stub-zone:", f'    name: "{z}."', f"    stub-addr: {host}@{sport}"]
    return "\n".join(lines) + "\n"


def start_unbound(
    workdir: str,
    stubs: Mapping[str, str],
    *,
    port: int = 0,
    timeout: float = 20,
) -> Unbound:
    """Start ``unbound -d`` resolving each zone of ``stubs`` (zone -> ``host:port``, which
    need not answer yet) from its server, on ``port`` (free if 0) of 127.0.0.1."""
    zones = {z.rstrip("."): server for z, server in stubs.items()}
    return retrying(lambda: _start(workdir, zones, port, timeout))


def _start(workdir: str, stubs: dict[str, str], port: int, timeout: float) -> Unbound:
    root = os.path.abspath(os.path.join(workdir, "unbound"))
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    port = port or free_udp_tcp_port()
    log_path = os.path.join(root, "unbound.log")
    anchor = ROOT_KEY if os.path.exists(ROOT_KEY) else None
    config_path = os.path.join(root, "unbound.conf")
    with open(config_path, "w") as f:
        f.write(unbound_config(root, port, stubs, log_path, anchor))
    unbound = Unbound(log_path, port=port, stubs=stubs, config_path=config_path)

    def ready() -> bool:  # answered from its own data: no upstream asked
        rcode, addrs = dns_query(port, "localhost.", "A", timeout=0.5)
        return rcode == 0 and bool(addrs)

    proc = spawn([UNBOUND, "-d", "-c", config_path], log_path)
    unbound.adopt(proc, ready, "unbound", timeout)
    return unbound
