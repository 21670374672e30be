"""bench/scale: csrproxy restarted on a state database holding N copies of one installation.

For each N: a fresh pebble and ``twistd -n csrproxy``, one CSR signed (one real
installation: its certificate row and its order row), the daemon stopped, that certificate
row and order row copied N - 1 times into the state database (sqlite3 on the file; each copy
its own certificate id, request key and order id, the two rows pointing at each other, the
chain and everything else kept), then the daemon started again on the same state directory
with ``[renewal] interval = 5`` and measured: time until ``/v1/health`` answers 200, RSS
right after and 20 s later, CPU in those 20 s, the CA requests it made, database size, and
the latency of a DNS query every 10 ms for 10 s while the renewal scheduler runs.
"""

from __future__ import annotations

import argparse
import http.client
import secrets
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.signbench import (
    ZONE,
    DNSProbe,
    acme_requests,
    check,
    cpu_seconds,
    make_requests,
    probe_dns,
)
from csrproxy.state.database import DB_NAME
from csrproxy.testing.daemon import start_csrproxy
from csrproxy.testing.pebble import start_pebble
from csrproxy.testing.ports import free_udp_tcp_port

#: Seconds between RSS readings (the second one is taken this long after ready).
RSS_LATER = 20.0
#: Seconds of the DNS query stream after ready.
DNS_SECONDS = 10.0
RENEWAL_INTERVAL = 5


@dataclass
class Row:
    n: int
    db_bytes: int = 0
    fill_s: float = float("nan")
    start_s: float = float("nan")
    rss0_kb: int = 0
    rss20_kb: int = 0
    cpu20_s: float = float("nan")
    acme: float = float("nan")
    dns: DNSProbe | None = None
    error: str | None = None


def rss_kb(pid: int) -> int:
    """VmRSS of ``pid`` in kB from /proc/<pid>/status; 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def db_size(state: Path) -> int:
    """Bytes of the database file and its WAL/SHM files."""
    return sum(p.stat().st_size for p in state.glob(DB_NAME + "*") if p.is_file())


def sign_one(url: str, timeout: float) -> None:
    """POST one CSR to ``url`` and check the answer; raise if it is not a good chain."""
    req = make_requests([f"scale0.{ZONE}"])[0]
    host, port = url.rsplit("/", 1)[1].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("POST", "/v1/sign", req.csr, {"Content-Type": "application/pkcs10"})
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    why = check(req, resp.status, body)
    if why is not None:
        raise RuntimeError(f"signing the one CSR failed: {why}: {body[:200]!r}")


def fill(db_path: Path, n: int) -> None:
    """Copy the one certificate row and its order row until there are ``n`` of each."""
    conn = sqlite3.connect(db_path, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        certs = conn.execute("SELECT * FROM certificates").fetchall()
        if len(certs) != 1:
            raise RuntimeError(f"expected one certificate row, found {len(certs)}")
        cert = dict(certs[0])
        order_row = conn.execute("SELECT * FROM orders WHERE id = ?", (cert["order_id"],))
        found = order_row.fetchone()
        if found is None:
            raise RuntimeError(f"the certificate's order {cert['order_id']!r} is not in orders")
        order = dict(found)
        c_cols, o_cols = list(cert), list(order)
        c_sql = (
            f"INSERT INTO certificates ({', '.join(c_cols)}) "
            f"VALUES ({', '.join('?' * len(c_cols))})"
        )
        o_sql = f"INSERT INTO orders ({', '.join(o_cols)}) VALUES ({', '.join('?' * len(o_cols))})"

        def copies(start: int, stop: int) -> tuple[list[list[Any]], list[list[Any]]]:
            cs, os_ = [], []
            for _ in range(start, stop):
                cid, oid, key = secrets.token_hex(16), secrets.token_hex(16), secrets.token_hex(32)
                c = {**cert, "id": cid, "request_key": key, "order_id": oid}
                o = {**order, "id": oid, "request_key": key, "certificate_id": cid}
                cs.append([c[k] for k in c_cols])
                os_.append([o[k] for k in o_cols])
            return cs, os_

        batch = 10_000
        for start in range(1, n, batch):
            cs, os_ = copies(start, min(n, start + batch))
            with conn:
                conn.executemany(c_sql, cs)
                conn.executemany(o_sql, os_)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def run_one(work: Path, n: int, args: argparse.Namespace) -> Row:
    row = Row(n)
    dns_port = free_udp_tcp_port()
    overrides: dict[str, dict[str, Any]] = {
        "acme": {"poll_interval": 0.005, "poll_max": 0.5},
        "policy": {
            "new_names_per_week": 0,
            "orders_per_3h": 0,
            "same_names_per_week": 0,
            "client_requests_per_hour": 0,
        },
        "renewal": {"interval": RENEWAL_INTERVAL},
    }
    with ExitStack() as stack:
        pebble = stack.enter_context(start_pebble(str(work / "pebble"), f"127.0.0.1:{dns_port}"))
        daemon_dir = str(work / "csrproxy")
        first = stack.enter_context(
            start_csrproxy(daemon_dir, pebble, dns_port, ZONE, overrides=overrides)
        )
        sign_one(first.url, args.timeout)
        first.stop()
        if first.proc.returncode is None:
            raise RuntimeError("the first csrproxy did not stop")

        state = work / "csrproxy" / "state"
        t0 = time.perf_counter()
        fill(state / DB_NAME, n)
        row.fill_s = time.perf_counter() - t0
        row.db_bytes = db_size(state)

        t0 = time.perf_counter()
        try:
            daemon = stack.enter_context(
                start_csrproxy(
                    daemon_dir,
                    pebble,
                    dns_port,
                    ZONE,
                    overrides=overrides,
                    timeout=args.start_timeout,
                )
            )
        except RuntimeError as e:
            row.error = f"not ready within {args.start_timeout:.0f} s"
            print(str(e)[-2000:], file=sys.stderr)
            return row
        ready = time.perf_counter()
        row.start_s = ready - t0
        pid = daemon.proc.pid
        row.rss0_kb = rss_kb(pid)
        cpu0 = cpu_seconds(pid)

        stop = threading.Event()
        timer = threading.Timer(DNS_SECONDS, stop.set)
        timer.start()
        try:
            row.dns = probe_dns(dns_port, stop, limit=int(DNS_SECONDS / 0.01) + 10)
        finally:
            timer.cancel()
            stop.set()
        threading.Event().wait(max(0.0, ready + RSS_LATER - time.perf_counter()))
        row.rss20_kb = rss_kb(pid)
        with suppress(OSError):
            row.cpu20_s = cpu_seconds(pid) - cpu0
        with suppress(OSError, urllib.error.URLError, ValueError, IndexError):
            row.acme = sum(acme_requests(daemon.url).values())
        if daemon.proc.poll() is not None:
            row.error = f"csrproxy exited with {daemon.proc.returncode}"
    return row


def mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:.1f}"


def report(rows: list[Row]) -> None:
    print()
    print(
        "| N | database MB | KB/installation | fill s | start s | RSS MB | RSS MB +20 s "
        "| CPU s in 20 s | CA requests | DNS p50 ms | p99 ms | max ms | lost/sent | errors |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        d = r.dns
        if d and d.latencies:
            dns = (
                f"{d.pct(50) * 1000:.2f} | {d.pct(99) * 1000:.2f} | "
                f"{max(d.latencies) * 1000:.1f} | {d.lost}/{d.sent}"
            )
        elif d:
            dns = f"- | - | - | {d.lost}/{d.sent}"
        else:
            dns = "- | - | - | -"
        print(
            f"| {r.n:,} | {mb(r.db_bytes)} | {r.db_bytes / r.n / 1000:.2f} | {r.fill_s:.1f} | "
            f"{r.start_s:.2f} | {mb(r.rss0_kb * 1000)} | {mb(r.rss20_kb * 1000)} | "
            f"{r.cpu20_s:.2f} | {r.acme:.0f} | {dns} | {r.error or 'none'} |"
        )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/scale", description=__doc__.splitlines()[0])
    p.add_argument(
        "--n", default="1000,10000", help="installations, comma-separated (default 1000,10000)"
    )
    p.add_argument("--start-timeout", type=float, default=600, help="seconds until ready")
    p.add_argument("--timeout", type=float, default=60, help="for the one sign request")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    try:
        sizes = [int(x.replace("_", "")) for x in args.n.split(",") if x.strip()]
    except ValueError:
        p.error(f"--n: not a list of integers: {args.n!r}")
    if not sizes or min(sizes) < 1:
        p.error("--n: each N must be at least 1")
    if shutil.which("pebble") is None and not Path("/usr/bin/pebble").exists():
        print("bench/scale: pebble is not installed (make system-deps)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="csrproxy-bench-scale."))
    rows: list[Row] = []
    try:
        for n in sizes:
            print(f"run: N = {n:,} ...", flush=True)
            rows.append(run_one(work / f"n{n}", n, args))
        report(rows)
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.error is None for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
