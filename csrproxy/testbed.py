"""Synchronous launchers for a loopback ACME testbed (pebble, PowerDNS) for pytest fixtures,
``make demo`` and benchmarks.  Everything listens on 127.0.0.1 on ports picked free at run time.
Each daemon is a child process, stopped by ``stop()``/the context manager, at interpreter exit,
and (Linux) when the thread that started it dies (PR_SET_PDEATHSIG).  Needs Debian ``pebble``,
``pdns-server``, ``pdns-backend-sqlite3``; no Python dependency beyond ``cryptography``."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import datetime
import ipaddress
import json
import os
import random
import signal
import socket
import sqlite3
import ssl
import struct
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

T = TypeVar("T")
PEBBLE_BIN = "/usr/bin/pebble"
PDNS_SCHEMA = "/usr/share/pdns-backend-sqlite3/schema/schema.sqlite3.sql"
PEBBLE_ENV_DEFAULTS = {
    "PEBBLE_VA_NOSLEEP": "1",
    "PEBBLE_WFE_NONCEREJECT": "0",
    "PEBBLE_AUTHZREUSE": "0",
}


# ---- ports
def free_port(kind: str = "tcp") -> int:
    """A port on 127.0.0.1 that is free right now for ``kind`` ("tcp" or "udp")."""
    stype = {"tcp": socket.SOCK_STREAM, "udp": socket.SOCK_DGRAM}[kind]
    with socket.socket(socket.AF_INET, stype) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_udp_tcp_port(attempts: int = 100) -> int:
    """A port on 127.0.0.1 free for both UDP and TCP (for a DNS server)."""
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = int(u.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no port free on both UDP and TCP")


# ---- TLS
def _cert(
    subject: str,
    issuer: str,
    pub: ec.EllipticCurvePublicKey,
    signer: ec.EllipticCurvePrivateKey,
    exts: Sequence[tuple[x509.ExtensionType, bool]],
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(pub)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
    )
    for ext, critical in exts:
        b = b.add_extension(ext, critical)
    return b.sign(signer, hashes.SHA256())


def make_tls_files(
    directory: str,
    hosts: Sequence[str] = ("127.0.0.1", "::1", "localhost"),
) -> tuple[str, str, str, str]:
    """Write a throwaway CA and a server cert for ``hosts`` (EC P-256, 30 days) into
    ``directory``; returns the paths ``(ca_cert, ca_key, cert, key)`` (``cert``: leaf only)."""
    os.makedirs(directory, exist_ok=True)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cn = "csrproxy testbed throwaway CA"
    ca = _cert(
        ca_cn,
        ca_cn,
        ca_key.public_key(),
        ca_key,
        [
            (x509.BasicConstraints(ca=True, path_length=0), True),
            (x509.KeyUsage(False, False, False, False, False, True, True, False, False), True),
            (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False),
        ],
    )
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    leaf = _cert(
        "localhost",
        ca_cn,
        key.public_key(),
        ca_key,
        [
            (x509.SubjectAlternativeName(sans), False),
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
            (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
        ],
    )
    pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    nokey = serialization.NoEncryption()
    paths = [os.path.join(directory, n) for n in ("ca.pem", "ca.key", "cert.pem", "key.pem")]
    for path, data in zip(
        paths,
        (
            ca.public_bytes(pem),
            ca_key.private_bytes(pem, pkcs8, nokey),
            leaf.public_bytes(pem),
            key.private_bytes(pem, pkcs8, nokey),
        ),
        strict=True,
    ):
        with open(path, "wb") as f:
            f.write(data)
    return paths[0], paths[1], paths[2], paths[3]


# ---- processes
_live: set[_Daemon] = set()  # stopped at exit


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@atexit.register
def _stop_all() -> None:
    for d in list(_live):
        d.stop()


def log_tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError as e:
        return f"(no log: {e})"


def _spawn(
    argv: Sequence[str],
    log_path: str,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
            env=dict(env) if env is not None else None,
        )


def _terminate(proc: subprocess.Popen[bytes], grace: float = 5) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass(eq=False)
class _Daemon:
    log_path: str
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def _start(
        self, proc: subprocess.Popen[bytes], ready: Callable[[], bool], what: str, timeout: float
    ) -> None:
        """Adopt ``proc``, poll ``ready()`` every 50 ms; if ``proc`` exits or ``timeout`` runs
        out, stop it and raise RuntimeError with the log's tail."""
        self.proc, deadline, last, log = proc, time.monotonic() + timeout, "", self.log_path
        _live.add(self)
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if ready():
                    return
            except Exception as e:
                last = f" (last error: {e!r})"
            threading.Event().wait(0.05)
        exited = proc.poll() is not None
        self.stop()
        why = (
            f"exited ({proc.returncode}) before it was ready"
            if exited
            else (f"was not ready within {timeout} s")
        )
        raise RuntimeError(f"{what} {why}{last}; log {log}:\n{log_tail(log)}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s.  Idempotent."""
        if self.proc is not None:
            _terminate(self.proc)
        _live.discard(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _retrying(start: Callable[[], T], attempts: int = 3) -> T:
    """Ports are picked free, then bound by the child: retry if another process won a port."""
    for _ in range(attempts - 1):
        try:
            return start()
        except RuntimeError as e:
            if "address already in use" not in str(e).lower():
                raise
    return start()


def _https_get(url: str, cafile: str, timeout: float = 5) -> bytes:
    ctx = ssl.create_default_context(cafile=cafile)
    with urllib.request.urlopen(url, context=ctx, timeout=timeout) as r:
        return bytes(r.read())


# ---- pebble
@dataclass(eq=False)
class Pebble(_Daemon):
    directory: str = ""  # https://127.0.0.1:PORT/dir
    ca_cert: str = ""  # PEM of the throwaway CA that signed pebble's HTTPS cert
    management: str = ""  # https://127.0.0.1:MPORT
    cert_path: str = ""  # pebble's HTTPS leaf (127.0.0.1, ::1, localhost): reusable by proxies
    key_path: str = ""
    ca_key: str = ""
    config_path: str = ""
    dns_server: str = ""

    def _mgmt(self, path: str) -> bytes:
        return _https_get(self.management + path, self.ca_cert)

    def root_pem(self, chain: int = 0) -> bytes:
        """The issuing root of chain ``chain`` (0 = default); it changes at every start."""
        return self._mgmt(f"/roots/{chain}")

    def intermediate_pem(self, chain: int = 0) -> bytes:
        return self._mgmt(f"/intermediates/{chain}")

    def directory_json(self) -> dict[str, Any]:
        return dict(json.loads(_https_get(self.directory, self.ca_cert)))


def start_pebble(
    workdir: str,
    dns_server: str,
    *,
    env: Mapping[str, str] | None = None,
    eab_keys: Mapping[str, str] | None = None,
    validity_seconds: int | None = None,
    extra_config: Mapping[str, Any] | None = None,
    timeout: float = 20,
) -> Pebble:
    """Start pebble on free loopback ports; its dns-01 validator asks ``dns_server`` (host:port).

    ``env`` overrides PEBBLE_VA_NOSLEEP=1, PEBBLE_WFE_NONCEREJECT=0, PEBBLE_AUTHZREUSE=0.
    ``eab_keys`` (kid -> base64url HMAC key) turns on externalAccountBindingRequired.
    ``extra_config`` is merged last into the ``"pebble"`` JSON object.
    """
    return _retrying(
        lambda: _start_pebble(
            workdir, dns_server, env, eab_keys, validity_seconds, extra_config, timeout
        )
    )


def _start_pebble(
    workdir: str,
    dns_server: str,
    env: Mapping[str, str] | None,
    eab_keys: Mapping[str, str] | None,
    validity_seconds: int | None,
    extra_config: Mapping[str, Any] | None,
    timeout: float,
) -> Pebble:
    os.makedirs(workdir, exist_ok=True)
    ca_cert, ca_key, cert, key = make_tls_files(os.path.join(workdir, "tls"))
    port, mport = free_port(), free_port()
    conf: dict[str, Any] = {
        "listenAddress": f"127.0.0.1:{port}",
        "managementListenAddress": f"127.0.0.1:{mport}",
        "certificate": cert,
        "privateKey": key,
        "httpPort": free_port(),
        "tlsPort": free_port(),
        "ocspResponderURL": "",
        "externalAccountBindingRequired": bool(eab_keys),
        "externalAccountMACKeys": dict(eab_keys or {}),
    }
    if validity_seconds is not None:
        conf["certificateValidityPeriod"] = validity_seconds
    conf.update(extra_config or {})
    config_path = os.path.join(workdir, "pebble-config.json")
    with open(config_path, "w") as f:
        json.dump({"pebble": conf}, f, indent=2)
    penv = {**os.environ, **PEBBLE_ENV_DEFAULTS, **(env or {})}
    log_path = os.path.join(workdir, "pebble.log")
    proc = _spawn([PEBBLE_BIN, "-config", config_path, "-dnsserver", dns_server], log_path, penv)
    peb = Pebble(
        log_path=log_path,
        directory=f"https://{conf['listenAddress']}/dir",
        management=f"https://{conf['managementListenAddress']}",
        ca_cert=ca_cert,
        cert_path=cert,
        key_path=key,
        ca_key=ca_key,
        config_path=config_path,
        dns_server=dns_server,
    )
    peb._start(
        proc,
        lambda: "newNonce" in json.loads(_https_get(peb.directory, ca_cert, 1)),
        "pebble",
        timeout,
    )
    return peb


# ---- DNS (tiny)
def _skip_name(msg: bytes, off: int) -> int:
    while msg[off] and msg[off] & 0xC0 != 0xC0:
        off += 1 + msg[off]
    return off + (2 if msg[off] else 1)


QTYPES = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "TXT": 16, "AAAA": 28, "CAA": 257}


def dns_query(
    port: int, name: str, qtype: str = "TXT", host: str = "127.0.0.1", timeout: float = 2
) -> tuple[int, list[bytes]]:
    """One UDP query; returns ``(rcode, [rdata of each answer of type qtype])``; a TXT rdata
    comes as the concatenation of its character strings (``txt_strings`` splits raw ones)."""
    qid, t = random.getrandbits(16), QTYPES[qtype.upper()]
    qname = b"".join(bytes([len(lb)]) + lb.encode() for lb in name.strip(".").split(".") if lb)
    query = struct.pack(">HHHHHH", qid, 0, 1, 0, 0, 0) + qname + b"\0" + struct.pack(">HH", t, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(query, (host, port))
        deadline = time.monotonic() + timeout
        while True:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            msg = s.recv(65535)
            if len(msg) >= 12 and struct.unpack(">H", msg[:2])[0] == qid:
                break
    _, flags, qd, an, _, _ = struct.unpack(">HHHHHH", msg[:12])
    off = 12
    for _ in range(qd):
        off = _skip_name(msg, off) + 4
    out: list[bytes] = []
    for _ in range(an):
        off = _skip_name(msg, off)
        rtype, _cls, _ttl, rdlen = struct.unpack(">HHIH", msg[off : off + 10])
        rdata, off = msg[off + 10 : off + 10 + rdlen], off + 10 + rdlen
        if rtype == t:
            out.append(b"".join(txt_strings(rdata)) if t == 16 else rdata)
    return flags & 0xF, out


def txt_strings(rdata: bytes) -> list[bytes]:
    out, i = [], 0
    while i < len(rdata):
        out.append(rdata[i + 1 : i + 1 + rdata[i]])
        i += 1 + rdata[i]
    return out


# ---- PowerDNS
@dataclass(eq=False)
class PowerDNS(_Daemon):
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
    return _retrying(lambda: _start_powerdns(workdir, zone, records, caches, timeout))


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
    proc = _spawn(["pdns_server", f"--config-dir={config_dir}"], log_path)
    pdns = PowerDNS(
        log_path=log_path,
        dns_port=dns_port,
        api_url=f"http://127.0.0.1:{api_port}",
        api_key=api_key,
        zone=zone,
        config_dir=config_dir,
    )
    pdns._start(
        proc,
        lambda: bool(pdns.rrsets()) and pdns.query(zone, "SOA")[0] == 0,
        "pdns_server",
        timeout,
    )
    return pdns
