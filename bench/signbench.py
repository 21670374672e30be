"""bench/sign: csrproxy against the original csr-proxy 0.1.0 on the same pebble setup.

Each run gets a freshly started pebble (pebble 2.4.0 can deadlock after several hundred
orders under concurrent load) and a freshly started signer: csrproxy (``twistd -n
csrproxy``, its own DNS answering pebble's dns-01 lookups) or the original (installed
from PyPI into a throwaway venv, with a PowerDNS that pebble asks).  Keys and CSRs are
made before the clock starts; every answer is checked (status, leaf key, names).
"""

from __future__ import annotations

import argparse
import http.client
import os
import queue
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from csrproxy.testing.daemon import start_csrproxy
from csrproxy.testing.pebble import Pebble, start_pebble
from csrproxy.testing.ports import free_port, free_udp_tcp_port
from csrproxy.testing.powerdns import start_powerdns

ZONE = "go.example.test"
PEER_SPEC = "csr-proxy==0.1.0"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def percentile(values: Sequence[float], p: float) -> float:
    """The nearest-rank ``p`` percentile; NaN for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))]


@dataclass
class Request:
    csr: bytes
    spki: bytes
    names: list[str]


@dataclass
class Outcome:
    label: str
    total: int
    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    wall: float = 0.0
    cpu: float = 0.0
    acme: dict[str, float] = field(default_factory=dict)
    dns_idle: DNSProbe | None = None
    dns_busy: DNSProbe | None = None

    @property
    def ok(self) -> int:
        return len(self.latencies)

    def pct(self, p: float) -> float:
        return percentile(self.latencies, p)

    @property
    def throughput(self) -> float:
        return self.ok / self.wall if self.wall else 0.0


@dataclass
class DNSProbe:
    """Latencies of a light stream of UDP queries (one every ``interval`` seconds)."""

    sent: int = 0
    latencies: list[float] = field(default_factory=list)

    @property
    def lost(self) -> int:
        return self.sent - len(self.latencies)

    def pct(self, p: float) -> float:
        return percentile(self.latencies, p)

    def row(self) -> str:
        if not self.latencies:
            return f"{self.sent} queries, all lost"
        return (
            f"{self.sent} queries, p50 {self.pct(50) * 1000:.2f} ms, "
            f"p99 {self.pct(99) * 1000:.2f} ms, max {max(self.latencies) * 1000:.2f} ms, "
            f"lost {self.lost}"
        )


def probe_dns(
    port: int, stop: threading.Event, interval: float = 0.01, limit: int = 30_000
) -> DNSProbe:
    """Query csrproxy's DNS on 127.0.0.1 every ``interval`` s until ``stop`` (or ``limit``).

    The query is built by dnspython, an independent DNS implementation; a reply counts when
    its id matches within 1 s.
    """
    import dns.message

    out = DNSProbe()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.0)
        while not stop.is_set() and out.sent < limit:
            query = dns.message.make_query(f"probe{out.sent}.{ZONE}", "A")
            wire = query.to_wire()
            t0 = time.perf_counter()
            sock.sendto(wire, ("127.0.0.1", port))
            out.sent += 1
            try:
                while True:
                    data = sock.recv(4096)
                    if data[:2] == wire[:2]:
                        out.latencies.append(time.perf_counter() - t0)
                        break
            except TimeoutError:
                pass
            stop.wait(max(0.0, interval - (time.perf_counter() - t0)))
    return out


def make_requests(names: Sequence[str]) -> list[Request]:
    out = []
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), False)
            .sign(key, hashes.SHA256())
        )
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        out.append(Request(csr.public_bytes(serialization.Encoding.PEM), spki, [name]))
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def check(req: Request, status: int, body: bytes) -> str | None:
    if status != 200:
        return f"http_{status}"
    try:
        leaf = x509.load_pem_x509_certificates(body)[0]
    except ValueError:
        return "not_pem"
    spki = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if spki != req.spki:
        return "wrong_key"
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    if sorted(sans.get_values_for_type(x509.DNSName)) != sorted(req.names):
        return "wrong_names"
    return None


def load(
    label: str,
    port: int,
    reqs: list[Request],
    concurrency: int,
    pid: int,
    timeout: float,
    max_duration: float,
) -> Outcome:
    """POST every CSR with ``concurrency`` keep-alive connections; time and check each."""
    todo: queue.Queue[int] = queue.Queue()
    for i in range(len(reqs)):
        todo.put(i)
    answers: list[tuple[int, bytes, float] | None] = [None] * len(reqs)
    deadline = time.monotonic() + max_duration

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                break
            if time.monotonic() > deadline:
                answers[i] = (-1, b"", 0.0)
                continue
            t0 = time.perf_counter()
            try:
                conn.request(
                    "POST", "/v1/sign", reqs[i].csr, {"Content-Type": "application/pkcs10"}
                )
                resp = conn.getresponse()
                body = resp.read()
                answers[i] = (resp.status, body, time.perf_counter() - t0)
            except (OSError, http.client.HTTPException) as e:
                answers[i] = (-2, type(e).__name__.encode(), 0.0)
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.close()

    cpu0 = cpu_seconds(pid)
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out = Outcome(label, len(reqs), wall=time.perf_counter() - t0)
    out.cpu = cpu_seconds(pid) - cpu0
    for req, answer in zip(reqs, answers, strict=True):
        assert answer is not None
        status, body, took = answer
        why = {-1: "skipped_max_duration", -2: f"transport_{body.decode()}"}.get(status)
        why = why or check(req, status, body)
        if why is None:
            out.latencies.append(took)
        else:
            out.errors[why] = out.errors.get(why, 0) + 1
    return out


def wait_http(url: str, timeout: float, alive: Callable[[], bool]) -> None:
    pause = threading.Event()
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not alive():
            raise RuntimeError(f"the process behind {url} exited")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except urllib.error.HTTPError:
            return  # any HTTP answer: it is up
        except OSError:
            pause.wait(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def peer_venv(path: Path) -> Path:
    exe = path / "bin" / "csr-proxy"
    if not exe.exists():
        print(f"installing {PEER_SPEC} into {path} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
        done = subprocess.run(
            [str(path / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", PEER_SPEC],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"pip install {PEER_SPEC} failed:\n{done.stdout}{done.stderr}")
    return exe


@contextmanager
def original(
    work: Path, exe: Path, pebble: Pebble, pdns_api: str, pdns_key: str
) -> Iterator[tuple[int, int]]:
    port = free_port()
    env = {
        **os.environ,
        "CSR_PROXY_ACME_DIRECTORY": pebble.directory,
        "CSR_PROXY_EMAIL": f"admin@{ZONE}",
        "CSR_PROXY_SUBJ": f"CN={ZONE}",
        "CSR_PROXY_PDNS_API_URL": pdns_api,
        "CSR_PROXY_PDNS_API_KEY": pdns_key,
        "CSR_PROXY_API_HOST": "127.0.0.1",
        "CSR_PROXY_API_PORT": str(port),
        "CSR_PROXY_STATE_PATH": str(work / "state.json"),
        "SSL_CERT_FILE": pebble.ca_cert,
    }
    with open(work / "csr-proxy.log", "ab") as log:
        proc = subprocess.Popen([str(exe)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/sign", 30, lambda: proc.poll() is None)
        yield port, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_csrproxy(
    work: Path, label: str, n: int, c: int, args: argparse.Namespace, start: int
) -> Outcome:
    reqs = make_requests([f"i{start + i}.{ZONE}" for i in range(n)])
    dns_port = free_udp_tcp_port()
    with ExitStack() as stack:
        pebble = stack.enter_context(start_pebble(str(work / "pebble"), f"127.0.0.1:{dns_port}"))
        overrides = {
            "acme": {"poll_interval": args.poll_interval, "poll_max": 0.5},
            "policy": {
                "new_names_per_week": 0,
                "orders_per_3h": 0,
                "same_names_per_week": 0,
                "client_requests_per_hour": 0,
            },
        }
        daemon = stack.enter_context(
            start_csrproxy(str(work / "csrproxy"), pebble, dns_port, ZONE, overrides=overrides)
        )
        port = int(daemon.url.rsplit(":", 1)[1])
        if args.py_spy:
            stack.enter_context(py_spy(daemon.proc.pid, f"{args.py_spy}.{label.split()[-1]}.txt"))
        # DNS latency on the shared reactor: 1 s idle, then while the load runs.
        idle_stop = threading.Event()
        threading.Timer(1.0, idle_stop.set).start()
        idle = probe_dns(dns_port, idle_stop)
        busy_stop = threading.Event()
        busy: list[DNSProbe] = []
        prober = threading.Thread(target=lambda: busy.append(probe_dns(dns_port, busy_stop)))
        prober.start()
        try:
            out = load(label, port, reqs, c, daemon.proc.pid, args.timeout, args.max_duration)
        finally:
            busy_stop.set()
            prober.join()
        out.dns_idle, out.dns_busy = idle, busy[0]
        out.acme = acme_requests(daemon.url)
        return out


def acme_requests(url: str) -> dict[str, float]:
    """csrproxy's ACME requests by endpoint, from its /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("csrproxy_acme_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            endpoint = labels.split('endpoint="', 1)[1].split('"', 1)[0]
            counts[endpoint] = counts.get(endpoint, 0) + float(value)
    return counts


@contextmanager
def py_spy(pid: int, out: str) -> Iterator[None]:
    """Sample ``pid`` with py-spy (collapsed stacks in ``out``) while the body runs."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    proc = subprocess.Popen(
        [exe, "record", "-p", str(pid), "-r", "500", "-f", "raw", "-o", out, "--nonblocking"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    threading.Event().wait(1.0)  # let it attach before the load starts
    try:
        yield
    finally:
        proc.send_signal(2)
        proc.wait(30)


def run_original(work: Path, label: str, n: int, c: int, args: argparse.Namespace) -> Outcome:
    reqs = make_requests([ZONE] * n)
    exe = peer_venv(Path(args.peer_venv))
    records = [("@", "A", "127.0.0.1"), ("ns1", "A", "127.0.0.1")]
    with ExitStack() as stack:
        pdns = stack.enter_context(start_powerdns(str(work / "pdns"), ZONE, records))
        pebble = stack.enter_context(start_pebble(str(work / "pebble"), pdns.dns_server))
        port, pid = stack.enter_context(original(work, exe, pebble, pdns.api_url, pdns.api_key))
        return load(label, port, reqs, c, pid, args.timeout, args.max_duration)


def report(rows: list[Outcome]) -> None:
    print()
    print("| run | ok/total | wall s | certs/s | p50 ms | p95 ms | p99 ms | CPU ms/cert | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        cpu = r.cpu / r.ok * 1000 if r.ok else float("nan")
        errs = ", ".join(f"{k} x{v}" for k, v in sorted(r.errors.items())) or "none"
        print(
            f"| {r.label} | {r.ok}/{r.total} | {r.wall:.2f} | {r.throughput:.1f} | "
            f"{r.pct(50) * 1000:.1f} | {r.pct(95) * 1000:.1f} | {r.pct(99) * 1000:.1f} | "
            f"{cpu:.2f} | {errs} |"
        )
    for r in rows:
        if r.acme and r.ok:
            per = ", ".join(f"{k} {v / r.ok:.2f}" for k, v in sorted(r.acme.items()))
            print(f"{r.label}: ACME requests per certificate (incl. account set-up): {per}")
    for r in rows:
        if r.dns_idle and r.dns_busy:
            print(f"{r.label}: DNS (A query every 10 ms) idle: {r.dns_idle.row()}")
            print(f"{r.label}: DNS (A query every 10 ms) while signing: {r.dns_busy.row()}")
    by = {r.label: r for r in rows}
    for c in ("c1", "c10"):
        ours, theirs = by.get(f"csrproxy {c}"), by.get(f"original {c}")
        if ours and theirs and ours.ok and theirs.ok:
            print(
                f"{c}: throughput x{ours.throughput / theirs.throughput:.1f}, "
                f"p50 latency /{theirs.pct(50) / ours.pct(50):.1f}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/sign", description=__doc__.splitlines()[0])
    p.add_argument("--n1", type=int, default=20, help="CSRs at concurrency 1")
    p.add_argument("--n10", type=int, default=100, help="CSRs at concurrency 10")
    p.add_argument("--poll-interval", type=float, default=0.005)
    p.add_argument("--timeout", type=float, default=60, help="per request")
    p.add_argument("--max-duration", type=float, default=300, help="per run")
    p.add_argument("--only", choices=["csrproxy", "original"], help="run one side only")
    p.add_argument("--peer-venv", default="/tmp/csrproxy-bench-peer-venv")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--py-spy", metavar="PREFIX", help="profile csrproxy with py-spy into PREFIX.*")
    args = p.parse_args(argv)
    for binary in ("pebble", "pdns_server", "pdnsutil"):
        if shutil.which(binary) is None:
            print(f"bench/sign: {binary} is not installed (make system-deps)", file=sys.stderr)
            return 2
    work = Path(tempfile.mkdtemp(prefix="csrproxy-bench-sign."))
    rows: list[Outcome] = []
    try:
        plan: list[tuple[str, int, int]] = [("c1", args.n1, 1), ("c10", args.n10, 10)]
        for side in ("csrproxy", "original"):
            if args.only and side != args.only:
                continue
            for tag, n, c in plan:
                label = f"{side} {tag}"
                print(f"run: {label} ({n} CSRs) ...", flush=True)
                run_dir = work / label.replace(" ", "-")
                if side == "csrproxy":
                    rows.append(run_csrproxy(run_dir, label, n, c, args, len(rows) * 1000))
                else:
                    rows.append(run_original(run_dir, label, n, c, args))
        report(rows)
    finally:
        if args.keep:
            print(f"work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if all(not r.errors for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
