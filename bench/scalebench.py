"""bench/scale: csrproxy started on a state database of N installations (issue 14).

First a baseline: a fresh pebble and ``twistd -n csrproxy`` on an empty state directory,
measured as below (the "0" row) and stopped; its database gives the schema.  Then for each
N: a database of N synthetic installations (``bench/scalefill.py``: distinct names and
keys, realistic chains; cached per N) or, with ``--copy``, N copies of one real
installation's rows; a fraction made due now (``--due``), ``--unfinished`` orders in
flight; a fresh pebble and the daemon started on it with ``[renewal] interval = 5``, and
measured: seconds until ``/v1/health/live`` and ``/v1/health`` answer 200, RSS at ready and
20 s later, CPU and CA requests in those 20 s, the renewal passes' cost from ``/metrics``,
the latency of a DNS query every 10 ms for those 20 s, then sign latency (concurrency 1,
new CSRs) against the same latency on the empty database.
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import subprocess
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

from bench.scalefill import (
    CACHE_MAX_AGE_H,
    POOL_EVERY,
    Schema,
    cached_or_generate,
    copy_rows,
    db_size,
    place,
    prepare,
)
from bench.signbench import (
    ZONE,
    DNSProbe,
    Outcome,
    check,
    cpu_seconds,
    load,
    make_requests,
    probe_dns,
)
from csrproxy.testing.daemon import Csrproxy, demo_config, to_toml, twistd_argv
from csrproxy.testing.pebble import Pebble, start_pebble
from csrproxy.testing.ports import free_port, free_udp_tcp_port

#: The state database's file name (csrproxy.state.database.DB_NAME).
DB_NAME = "csrproxy.sqlite3"
#: Seconds measured after ready: RSS at the end, CPU, CA requests, the DNS stream.
WINDOW = 20.0
DNS_INTERVAL = 0.01
RENEWAL_INTERVAL = 5
#: How often start-up is polled.
POLL = 0.02
#: The name whose real certificate --copy copies.
COPY_NAME = f"scale0.{ZONE}"
OVERRIDES: dict[str, dict[str, Any]] = {
    "acme": {"poll_interval": 0.005, "poll_max": 0.5},
    "policy": {
        "new_names_per_week": 0,
        "orders_per_3h": 0,
        "same_names_per_week": 0,
        "client_requests_per_hour": 0,
    },
    "renewal": {"interval": RENEWAL_INTERVAL},
}

#: Issue 14's bars (with 1,000,000 certificates).
BAR_LIVE_S = 3.0
BAR_RSS_MB = 150.0
BAR_DNS_P99_MS = 5.0
BAR_DNS_MAX_MS = 50.0
BAR_SIGN_RATIO = 1.5


@dataclass
class Row:
    n: int
    mode: str = "synthetic"
    db_bytes: int = 0
    fill_s: float = float("nan")
    cached: bool = False
    prep_s: float = float("nan")
    due: int = 0
    unfinished: int = 0
    live_s: float | None = None
    ready_s: float | None = None
    rss0_kb: int = 0
    rss20_kb: int = 0
    cpu20_s: float = float("nan")
    acme: float | None = None
    passes: float | None = None
    pass_s: float | None = None
    #: The slowest pass took at most this long (the histogram's bucket), e.g. "0.25".
    pass_max: str | None = None
    #: csrproxy_renewals_total and csrproxy_ari_lookups_total by outcome.
    renewals: dict[str, float] | None = None
    ari: dict[str, float] | None = None
    log_lines: int = 0
    dns: DNSProbe | None = None
    sign: Outcome | None = None
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


class Metrics:
    """One scrape of csrproxy's /metrics: sample name -> {labels text: value}."""

    def __init__(self, text: str) -> None:
        self.samples: dict[str, dict[str, float]] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, _, value = line.rpartition(" ")
            name, _, labels = name_labels.partition("{")
            with suppress(ValueError):
                self.samples.setdefault(name, {})[labels.rstrip("}")] = float(value)

    @classmethod
    def scrape(cls, url: str) -> Metrics:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
            return cls(resp.read().decode())

    def total(self, name: str) -> float | None:
        found = self.samples.get(name)
        return None if found is None else sum(found.values())

    def by(self, name: str, label: str) -> dict[str, float] | None:
        """``name``'s samples by the value of ``label`` (all under "" without it)."""
        found = self.samples.get(name)
        if found is None:
            return None
        out: dict[str, float] = {}
        for labels, value in found.items():
            key = _label(labels, label) or ""
            out[key] = out.get(key, 0.0) + value
        return out

    def max_bucket(self, name: str) -> str | None:
        """The smallest ``le`` of histogram ``name`` holding every observation."""
        buckets = self.by(name + "_bucket", "le")
        count = self.total(name + "_count")
        if not buckets or not count:
            return None
        for le, n in sorted(buckets.items(), key=lambda kv: float(kv[0])):
            if n >= count:
                return le
        return None


def _label(labels: str, key: str) -> str | None:
    for part in labels.split(","):
        k, _, v = part.partition("=")
        if k.strip() == key:
            return v.strip().strip('"')
    return None


def spawn(work: Path, pebble: Pebble, dns_port: int) -> Csrproxy:
    """Start ``twistd -n csrproxy`` on ``work`` (state in ``work/state``) without waiting."""
    work.mkdir(parents=True, exist_ok=True)
    api_port = free_port()
    config = demo_config(work, pebble, dns_port, ZONE, api_port)
    for section, values in OVERRIDES.items():
        config.setdefault(section, {}).update(values)
    path = work / "csrproxy.toml"
    path.write_text(to_toml(config))
    log = work / "csrproxy.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            twistd_argv(path),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=work,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return Csrproxy(proc, f"http://127.0.0.1:{api_port}", path, log)


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return None


def wait_started(daemon: Csrproxy, t0: float, timeout: float) -> tuple[float | None, float | None]:
    """Seconds from ``t0`` until /v1/health/live and /v1/health first answer 200 (None:
    not within ``timeout`` or the daemon exited)."""
    pause = threading.Event()
    live = ready = None
    while time.perf_counter() - t0 < timeout and daemon.proc.poll() is None:
        if live is None and _status(daemon.url + "/v1/health/live") == 200:
            live = time.perf_counter() - t0
        if _status(daemon.url + "/v1/health") == 200:
            ready = time.perf_counter() - t0
            break
        pause.wait(POLL)
    return live, ready


def measure(
    row: Row, work: Path, pebble: Pebble, dns_port: int, args: argparse.Namespace, names: str
) -> Csrproxy | None:
    """Start the daemon on ``work`` and fill in ``row``; the daemon is returned running
    (None when it did not become ready)."""
    t0 = time.perf_counter()
    daemon = spawn(work, pebble, dns_port)
    try:
        row.live_s, row.ready_s = wait_started(daemon, t0, args.start_timeout)
    except BaseException:
        daemon.stop()
        raise
    if row.ready_s is None:
        row.error = (
            f"csrproxy exited with {daemon.proc.returncode}"
            if daemon.proc.poll() is not None
            else f"not ready within {args.start_timeout:.0f} s"
        )
        print(daemon.log_tail(), file=sys.stderr)
        daemon.stop()
        return None
    try:
        measure_ready(row, daemon, dns_port, args, names)
    except BaseException:
        daemon.stop()
        raise
    return daemon


def measure_ready(
    row: Row, daemon: Csrproxy, dns_port: int, args: argparse.Namespace, names: str
) -> None:
    ready = time.perf_counter()
    pid = daemon.proc.pid
    row.rss0_kb = rss_kb(pid)
    cpu0 = cpu_seconds(pid)

    # The DNS stream for the whole window: passes run every 5 s.
    stop = threading.Event()
    probes: list[DNSProbe] = []
    limit = int(WINDOW / DNS_INTERVAL) + 10
    prober = threading.Thread(target=lambda: probes.append(probe_dns(dns_port, stop, limit=limit)))
    prober.start()
    try:
        stop.wait(max(0.0, ready + WINDOW - time.perf_counter()))
    finally:
        stop.set()
        prober.join(10)
    row.dns = probes[0] if probes else None
    row.rss20_kb = rss_kb(pid)
    with suppress(OSError):
        row.cpu20_s = cpu_seconds(pid) - cpu0
    with suppress(OSError, ValueError):
        m = Metrics.scrape(daemon.url)
        row.acme = m.total("csrproxy_acme_requests_total")
        row.passes = m.total("csrproxy_renewal_pass_seconds_count")
        total = m.total("csrproxy_renewal_pass_seconds_sum")
        if row.passes and total is not None:
            row.pass_s = total / row.passes
        row.pass_max = m.max_bucket("csrproxy_renewal_pass_seconds")
        row.renewals = m.by("csrproxy_renewals_total", "outcome")
        row.ari = m.by("csrproxy_ari_lookups_total", "outcome")
    with suppress(OSError), open(daemon.log, "rb") as f:
        row.log_lines = sum(1 for _ in f)

    reqs = make_requests([f"{names}{i}.{ZONE}" for i in range(args.sign)])
    port = int(daemon.url.rsplit(":", 1)[1])
    row.sign = load("sign c1", port, reqs, 1, pid, args.timeout, args.sign_max_duration)
    if daemon.proc.poll() is not None:
        row.error = f"csrproxy exited with {daemon.proc.returncode}"
    elif row.sign.errors:
        row.error = "sign: " + ", ".join(f"{k} x{v}" for k, v in sorted(row.sign.errors.items()))


def sign_one(url: str, name: str, timeout: float) -> None:
    """POST one CSR for ``name`` and check the answer; raise if it is not a good chain."""
    req = make_requests([name])[0]
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
        raise RuntimeError(f"signing {name} failed: {why}: {body[:200]!r}")


def baseline(work: Path, args: argparse.Namespace) -> tuple[Row, Schema]:
    """The empty database's row (the sign baseline) and the schema the daemon made; with
    --copy its database also holds the one real installation to copy."""
    row = Row(0, mode="empty")
    dns_port = free_udp_tcp_port()
    with ExitStack() as stack:
        pebble = stack.enter_context(start_pebble(str(work / "pebble"), f"127.0.0.1:{dns_port}"))
        daemon = measure(row, work / "csrproxy", pebble, dns_port, args, "e")
        if daemon is None:
            raise RuntimeError(f"the daemon on an empty database did not start: {row.error}")
        stack.callback(daemon.stop)
        if args.copy:
            sign_one(daemon.url, COPY_NAME, args.timeout)
    row.db_bytes = db_size(work / "csrproxy" / "state", DB_NAME)
    return row, Schema.read(work / "csrproxy" / "state" / DB_NAME)


def run_one(
    work: Path, n: int, schema: Schema, empty: Path, args: argparse.Namespace
) -> tuple[Row, Path | None]:
    """One N; returns its row and the cached database used (None with --copy)."""
    row = Row(n, mode="copy" if args.copy else "synthetic")
    state = work / "csrproxy" / "state"
    db_path = state / DB_NAME
    made: float | None = None
    cached_path = None
    if args.copy:
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        t0 = time.perf_counter()
        copy_rows(db_path, schema, empty, COPY_NAME, n)
        os.chmod(db_path, 0o600)
        row.fill_s = time.perf_counter() - t0
        prep_s = 0.0
    else:
        filled = cached_or_generate(
            args.cache, schema, n, ZONE, args.cache_max_age, args.regenerate
        )
        cached_path = filled.path
        row.fill_s, row.cached, made = filled.fill_s, filled.cached, filled.made
        if filled.cached:
            print(f"  cached database: {filled.path} ({filled.age_s / 3600:.1f} h old)")
        t0 = time.perf_counter()
        place(filled.path, db_path)
        prep_s = time.perf_counter() - t0

    dns_port = free_udp_tcp_port()
    with ExitStack() as stack:
        pebble = stack.enter_context(start_pebble(str(work / "pebble"), f"127.0.0.1:{dns_port}"))
        ca_base = pebble.directory.rsplit("/", 1)[0]
        prepared = prepare(
            db_path,
            schema,
            n=n,
            due=0.0 if args.copy else args.due,
            unfinished=args.unfinished,
            ca_base=ca_base,
            zone=ZONE,
            made=made,
        )
        row.prep_s = prep_s + prepared.seconds
        row.due, row.unfinished = prepared.due, prepared.unfinished
        row.db_bytes = db_size(state, DB_NAME)
        daemon = measure(row, work / "csrproxy", pebble, dns_port, args, f"s{n}-")
        if daemon is not None:
            daemon.stop()
    return row, cached_path


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "n/a" if x is None or x != x else format(x, fmt)


def outcomes(counts: dict[str, float] | None) -> str:
    """``{"renewed": 10, "started": 10}`` as "renewed 10, started 10"; "n/a" for None."""
    if counts is None:
        return "n/a"
    shown = [f"{k} {v:.0f}".strip() for k, v in sorted(counts.items()) if v]
    return ", ".join(shown) or "0"


def mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:.1f}"


def misses(r: Row, base: Row) -> list[str]:
    """The issue's bars this row misses."""
    out = []
    if r.live_s is None or r.live_s > BAR_LIVE_S:
        out.append("API")
    if max(r.rss0_kb, r.rss20_kb) / 1000 > BAR_RSS_MB:
        out.append("RSS")
    d = r.dns
    if d is None or not d.latencies or d.pct(99) * 1000 >= BAR_DNS_P99_MS:
        out.append("DNS p99")
    if d is None or not d.latencies or max(d.latencies) * 1000 >= BAR_DNS_MAX_MS or d.lost:
        out.append("DNS max")
    ratio = sign_ratio(r, base)
    if ratio is None or ratio > BAR_SIGN_RATIO:
        out.append("sign")
    return out


def sign_ratio(r: Row, base: Row) -> float | None:
    if not (r.sign and r.sign.ok and base.sign and base.sign.ok):
        return None
    return r.sign.pct(50) / base.sign.pct(50)


def report(rows: list[Row], base: Row) -> None:
    print()
    print(
        "| N | rows | database MB | KB/installation | fill s | prep s | due | unfinished "
        "| API live s | ready s | RSS MB | RSS MB +20 s | CPU s in 20 s | CA requests "
        "| log lines |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in [base, *rows]:
        per = f"{r.db_bytes / r.n / 1000:.2f}" if r.n else "-"
        fill = "-" if not r.n else f"{r.fill_s:.1f}" + (" (cached)" if r.cached else "")
        print(
            f"| {r.n:,} | {r.mode} | {mb(r.db_bytes)} | {per} | {fill} | "
            f"{_f(r.prep_s, '.1f') if r.n else '-'} | {r.due:,} | {r.unfinished:,} | "
            f"{_f(r.live_s)} | {_f(r.ready_s)} | {mb(r.rss0_kb * 1000)} | "
            f"{mb(r.rss20_kb * 1000)} | {_f(r.cpu20_s)} | {_f(r.acme, '.0f')} | "
            f"{r.log_lines:,} |"
        )
    print(
        f"| bar | | | | | | | 10,000 | ≤ {BAR_LIVE_S:.0f} | | ≤ {BAR_RSS_MB:.0f} "
        f"| ≤ {BAR_RSS_MB:.0f} | | | |"
    )
    print()
    print(
        "| N | passes | s/pass | slowest s | renewals | ARI look-ups | DNS p50 ms | p99 ms "
        "| max ms | lost/sent "
        "| sign p50 ms | p90 ms | vs empty | misses | errors |"
    )
    print("|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for r in [base, *rows]:
        d = r.dns
        if d and d.latencies:
            dns = (
                f"{d.pct(50) * 1000:.2f} | {d.pct(99) * 1000:.2f} | "
                f"{max(d.latencies) * 1000:.1f} | {d.lost}/{d.sent}"
            )
        else:
            dns = f"- | - | - | {d.lost}/{d.sent}" if d else "- | - | - | -"
        s = r.sign
        sign = f"{s.pct(50) * 1000:.1f} | {s.pct(90) * 1000:.1f}" if s and s.ok else "- | -"
        ratio = sign_ratio(r, base) if r.n else None
        missed = (", ".join(misses(r, base)) or "none") if r.n else "-"
        print(
            f"| {r.n:,} | {_f(r.passes, '.0f')} | {_f(r.pass_s, '.3f')} | "
            f"{'n/a' if r.pass_max is None else '≤ ' + r.pass_max} | "
            f"{outcomes(r.renewals)} | {outcomes(r.ari)} | {dns} | {sign} | {_f(ratio)} | "
            f"{missed} | "
            f"{r.error or 'none'} |"
        )
    print(
        f"| bar | | | | | | | < {BAR_DNS_P99_MS:.0f} | < {BAR_DNS_MAX_MS:.0f} | 0 lost | | "
        f"| ≤ {BAR_SIGN_RATIO} | | |"
    )
    print(
        "\n(bars: issue 14, with 1,000,000 certificates and 10,000 unfinished orders; "
        "'misses' names those a row misses)"
    )


def parse_sizes(p: argparse.ArgumentParser, texts: Sequence[str]) -> list[int]:
    sizes = []
    for text in texts:
        for part in text.split(","):
            if not part.strip():
                continue
            try:
                sizes.append(int(part.replace("_", "")))
            except ValueError:
                p.error(f"not an integer: {part!r}")
    if any(n < 1 for n in sizes):
        p.error("each N must be at least 1")
    return sizes


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/scale", description=__doc__.splitlines()[0])
    p.add_argument("sizes", nargs="*", metavar="N", help="installations (default 10k,100k,1M)")
    p.add_argument("--n", help="installations, comma-separated (the same as N ...)")
    p.add_argument(
        "--copy",
        action="store_true",
        help="N copies of one real installation's rows (issue 14's check) instead",
    )
    p.add_argument(
        "--due",
        type=float,
        default=0.001,
        help=f"fraction due now and active (default 0.001, at most {1 / POOL_EVERY})",
    )
    p.add_argument(
        "--unfinished", type=int, default=0, help="orders in flight at start (default 0)"
    )
    p.add_argument("--sign", type=int, default=50, help="CSRs signed at concurrency 1")
    p.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "csrproxy-bench-scale-cache",
        help="where filled databases are kept, one per N (default: in the temp dir)",
    )
    p.add_argument(
        "--cache-max-age",
        type=float,
        default=CACHE_MAX_AGE_H,
        help=f"hours a cached database is used (default {CACHE_MAX_AGE_H:.0f})",
    )
    p.add_argument("--regenerate", action="store_true", help="fill anew even if cached")
    p.add_argument("--start-timeout", type=float, default=600, help="seconds until ready")
    p.add_argument("--timeout", type=float, default=60, help="per sign request")
    p.add_argument("--sign-max-duration", type=float, default=120, help="per sign run")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    sizes = parse_sizes(p, [*args.sizes, *([args.n] if args.n else [])]) or [
        10_000,
        100_000,
        1_000_000,
    ]
    if not 0 <= args.due <= 1 / POOL_EVERY:
        p.error(f"--due: between 0 and {1 / POOL_EVERY}")
    if args.unfinished < 0 or args.sign < 1:
        p.error("--unfinished must be at least 0 and --sign at least 1")
    if not args.cache_max_age * 3600 < 7 * 86400:
        p.error("--cache-max-age: under 168 hours (the fill's leaves stay not due 7 days)")
    if shutil.which("pebble") is None and not Path("/usr/bin/pebble").exists():
        print("bench/scale: pebble is not installed (make system-deps)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="csrproxy-bench-scale."))
    rows: list[Row] = []
    used: set[Path] = set()
    try:
        print("run: empty database (baseline) ...", flush=True)
        base, schema = baseline(work / "empty", args)
        empty_db = work / "empty" / "csrproxy" / "state" / DB_NAME
        for n in sizes:
            mode = "copies of one installation" if args.copy else "synthetic installations"
            print(f"run: N = {n:,} {mode} ...", flush=True)
            row, cached = run_one(work / f"n{n}", n, schema, empty_db, args)
            rows.append(row)
            if cached is not None:
                used.add(cached)
            if not args.keep:
                shutil.rmtree(work / f"n{n}", ignore_errors=True)
        report(rows, base)
        for path in sorted(used):
            print(f"cached: {path} ({mb(path.stat().st_size)} MB)")
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r.error is None for r in [*rows]) else 1


if __name__ == "__main__":
    sys.exit(main())
