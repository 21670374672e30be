"""An authoritative PowerDNS (Debian ``pdns-server``, sqlite backend) on free loopback ports."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from csrproxy.testing.dnsquery import dns_query
from csrproxy.testing.ports import free_port, free_udp_tcp_port
from csrproxy.testing.processes import Daemon, retrying, spawn

PDNS_SCHEMA = "/usr/share/pdns-backend-sqlite3/schema/schema.sqlite3.sql"


@dataclass(eq=False)
class PowerDNS(Daemon):
    dns_port: int = 0
    api_url: str = ""  # http://127.0.0.1:PORT
    api_key: str = ""
    zone: str = ""  # without the trailing dot
    config_dir: str = ""

    @property
    def dns_server(self) -> str:
        """``127.0.0.1:PORT``, as pebble's ``-dnsserver`` wants it."""
        return f"127.0.0.1:{self.dns_port}"

    @property
    def zone_url(self) -> str:
        return f"{self.api_url}/api/v1/servers/localhost/zones/{self.zone}."

    def api(self, method: str, url: str, body: Any = None) -> Any:
        """One call to the PowerDNS HTTP API; returns the decoded JSON (None when empty)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            url,
            data=data,
            method=method,
            headers={"X-API-Key": self.api_key, "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def rrsets(self) -> list[dict[str, Any]]:
        return list(self.api("GET", self.zone_url)["rrsets"])

    def set_txt(self, name: str, values: Sequence[str], ttl: int = 60) -> None:
        """REPLACE the TXT rrset at ``name`` (FQDN, dot optional); empty ``values`` deletes it."""
        fqdn = name.rstrip(".") + "."
        rrset: dict[str, Any] = {
            "name": fqdn,
            "type": "TXT",
            "ttl": ttl,
            "changetype": "REPLACE" if values else "DELETE",
        }
        if values:
            rrset["records"] = [{"content": json.dumps(v), "disabled": False} for v in values]
        self.api("PATCH", self.zone_url, {"rrsets": [rrset]})

    def query(self, name: str, qtype: str = "TXT") -> tuple[int, list[bytes]]:
        return dns_query(self.dns_port, name, qtype)


def start_powerdns(
    workdir: str,
    zone: str,
    records: Sequence[tuple[str, str, str]] = (),
    *,
    caches: bool = False,
    timeout: float = 20,
) -> PowerDNS:
    """Start an authoritative PowerDNS (sqlite backend) for ``zone`` on free loopback ports;
    ``records`` are ``(name relative to the zone or "@", type, content)``, TTL 60."""
    return retrying(lambda: _start_powerdns(workdir, zone, records, caches, timeout))


def _start_powerdns(
    workdir: str, zone: str, records: Sequence[tuple[str, str, str]], caches: bool, timeout: float
) -> PowerDNS:
    zone = zone.rstrip(".")
    config_dir = os.path.abspath(os.path.join(workdir, "pdns"))
    os.makedirs(config_dir, exist_ok=True)
    dns_port, api_port = free_udp_tcp_port(), free_port()
    api_key = os.urandom(12).hex()
    db = os.path.join(config_dir, "pdns.sqlite3")
    conf = {
        "launch": "gsqlite3",
        "gsqlite3-database": db,
        "local-address": "127.0.0.1",
        "local-port": str(dns_port),
        "daemon": "no",
        "guardian": "no",
        "socket-dir": config_dir,
        "disable-syslog": "yes",
        "loglevel": "4",
        "webserver": "yes",
        "api": "yes",
        "api-key": api_key,
        "webserver-address": "127.0.0.1",
        "webserver-port": str(api_port),
        "webserver-allow-from": "127.0.0.0/8",
        "disable-axfr": "yes",
        "default-soa-content": f"ns1.{zone}. hostmaster.@ 0 10800 3600 604800 60",
    }
    if not caches:
        conf.update(
            {
                "cache-ttl": "0",
                "negquery-cache-ttl": "0",
                "query-cache-ttl": "0",
                "zone-cache-refresh-interval": "0",
            }
        )
    with open(os.path.join(config_dir, "pdns.conf"), "w") as f:
        f.writelines(f"{k}={v}\n" for k, v in conf.items())
    with contextlib.suppress(FileNotFoundError):
        os.unlink(db)
    with open(PDNS_SCHEMA) as f, contextlib.closing(sqlite3.connect(db)) as con:
        con.executescript(f.read())
    log_path = os.path.join(workdir, "pdns.log")
    util = ["pdnsutil", f"--config-dir={config_dir}"]
    cmds = [[*util, "create-zone", zone, f"ns1.{zone}"]]
    cmds += [[*util, "add-record", zone, n, t, "60", c] for n, t, c in records]
    for cmd in cmds:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr}{r.stdout}")
    proc = spawn(["pdns_server", f"--config-dir={config_dir}"], log_path)
    pdns = PowerDNS(
        log_path=log_path,
        dns_port=dns_port,
        api_url=f"http://127.0.0.1:{api_port}",
        api_key=api_key,
        zone=zone,
        config_dir=config_dir,
    )
    pdns.adopt(
        proc,
        lambda: bool(pdns.rrsets()) and pdns.query(zone, "SOA")[0] == 0,
        "pdns_server",
        timeout,
    )
    return pdns
