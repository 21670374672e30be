"""README "Install as a service", run in a scratch root: ``scripts/install-service``.

As far as a machine without systemd allows: the venv (Debian's python3), the csrproxy user
and group (in the scratch root's /etc/passwd), /etc/csrproxy with its modes, the tokens
file, the state directory and the unit (``systemd-analyze verify`` on it), then twistd
started as the unit starts it — its ExecStart, as the csrproxy user — against pebble, and
checked the README's way: ``/v1/health``, ``dig`` and a test CSR signed with curl and the
token the install printed.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from csrproxy.testing.daemon import Csrproxy, to_toml, wait_ready
from csrproxy.testing.pebble import start_pebble
from csrproxy.testing.ports import free_port, free_udp_tcp_port
from tests.conftest import ZONE, need
from tests.support.keys import make_csr

pytestmark = pytest.mark.integration

CHECKOUT = Path(__file__).resolve().parents[2]
DEBIAN_PYTHON = "/usr/bin/python3"


@pytest.fixture(scope="module")
def installed() -> Iterator[tuple[Path, str]]:
    """The scratch root after the install, and the token it printed."""
    if os.geteuid() != 0:
        pytest.skip("the install runs as root (CI does)")
    for tool in ("useradd", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"no {tool}")
    need(DEBIAN_PYTHON)
    # Traversable by the service user (pytest's own temporary directories are 0700).
    root = Path(tempfile.mkdtemp(prefix="csrproxy-install-", dir="/tmp"))
    root.chmod(0o755)
    try:
        done = subprocess.run(
            [str(CHECKOUT / "scripts" / "install-service"), "--root", str(root)],
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "PYTHON": DEBIAN_PYTHON},
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        found = re.search(r"token \(give it to the client\): (\S+)", done.stdout + done.stderr)
        assert found, done.stdout + done.stderr
        yield root, found.group(1)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def ids(root: Path) -> tuple[int, int]:
    entry = next(
        line
        for line in (root / "etc/passwd").read_text().splitlines()
        if line.startswith("csrproxy:")
    )
    fields = entry.split(":")
    return int(fields[2]), int(fields[3])


def test_files_users_and_modes(installed: tuple[Path, str]) -> None:
    root, _ = installed
    uid, gid = ids(root)
    assert uid < 1000, "a system user"
    passwd = next(x for x in (root / "etc/passwd").read_text().splitlines() if "csrproxy" in x)
    assert passwd.endswith(":/var/lib/csrproxy:/usr/sbin/nologin"), passwd

    def mode(path: str) -> tuple[int, int, int]:
        st = (root / path).stat()
        return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid

    assert mode("etc/csrproxy") == (0o750, 0, gid)
    assert mode("etc/csrproxy/csrproxy.toml") == (0o640, 0, gid)
    assert mode("etc/csrproxy/tokens") == (0o640, 0, gid)
    assert mode("var/lib/csrproxy") == (0o700, uid, gid)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}\n", (root / "etc/csrproxy/tokens").read_text())
    config = tomllib.loads((root / "etc/csrproxy/csrproxy.toml").read_text())
    assert config["api"]["tokens_file"] == "/etc/csrproxy/tokens"
    assert config["state"]["dir"] == "/var/lib/csrproxy"
    venv = root / "opt/csrproxy"
    assert (venv / "bin/twistd").exists() and (venv / "bin/csrproxy-admin").exists()
    caches = list(venv.glob("lib/python3*/site-packages/twisted/plugins/dropin.cache"))
    assert caches, "the plugin cache was built at install time"
    unit = (root / "etc/systemd/system/csrproxy.service").read_text()
    assert unit == (CHECKOUT / "systemd/csrproxy.service").read_text()


def test_the_unit_verifies(installed: tuple[Path, str]) -> None:
    root, _ = installed
    if shutil.which("systemd-analyze") is None:
        pytest.skip("no systemd-analyze")
    # verify checks its commands exist: at their place in the scratch root.
    unit = root / "csrproxy.service"
    text = (root / "etc/systemd/system/csrproxy.service").read_text()
    unit.write_text(text.replace("/opt/csrproxy", str(root / "opt/csrproxy")))
    done = subprocess.run(
        ["systemd-analyze", "verify", "--recursive-errors=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def unit_exec_start(root: Path) -> list[str]:
    """The unit's ExecStart, its paths in the scratch root."""
    text = (root / "etc/systemd/system/csrproxy.service").read_text()
    line = next(x for x in text.splitlines() if x.startswith("ExecStart="))
    argv = line.removeprefix("ExecStart=").split()
    return [a.replace("/opt/csrproxy", str(root / "opt/csrproxy")).replace(
        "/etc/csrproxy", str(root / "etc/csrproxy")) for a in argv]  # fmt: skip


def test_twistd_started_as_the_unit_starts_it_signs(
    installed: tuple[Path, str], tmp_path: Path
) -> None:
    root, token = installed
    uid, gid = ids(root)
    etc = root / "etc/csrproxy"
    dns_port, api_port = free_udp_tcp_port(), free_port()
    with start_pebble(str(tmp_path / "pebble"), f"127.0.0.1:{dns_port}") as pebble:
        ca = etc / "pebble-ca.pem"
        shutil.copy(pebble.ca_cert, ca)
        ca.chmod(0o644)
        # The operator's edit of the installed config: this CA, this zone, loopback ports;
        # paths in the scratch root.
        config: dict[str, Any] = tomllib.loads((etc / "csrproxy.toml").read_text())
        config["acme"] |= {"directory": pebble.directory, "ca_certs": str(ca),
                           "poll_interval": 0.01, "poll_max": 1.0}  # fmt: skip
        config["api"] |= {"listen": [f"tcp:{api_port}:interface=127.0.0.1"],
                          "tokens_file": str(etc / "tokens")}  # fmt: skip
        config["dns"] |= {
            "zone": ZONE,
            "listen": [f"127.0.0.1:{dns_port}"],
            "nameservers": [f"ns1.{ZONE}"],
            "records": ["@ A 127.0.0.1", "ns1 A 127.0.0.1", "* A 127.0.0.1"],
            "caa": False,
        }
        config["policy"] |= {"names": [f"{{label}}.{ZONE}"]}
        config["state"]["dir"] = str(root / "var/lib/csrproxy")
        (etc / "csrproxy.toml").write_text(to_toml(config))
        log = tmp_path / "csrproxy.log"
        argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                *unit_exec_start(root)]  # fmt: skip
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, cwd="/",
                env={"PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1", "LANG": "C.UTF-8"},
            )  # fmt: skip
        daemon = Csrproxy(proc, f"http://127.0.0.1:{api_port}", etc / "csrproxy.toml", log)
        try:
            assert wait_ready(daemon, 60), daemon.log_tail()
            soa = subprocess.run(
                ["dig", "+short", "-p", str(dns_port), "@127.0.0.1", ZONE, "SOA"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout  # fmt: skip
            assert soa.startswith(f"ns1.{ZONE}."), soa
            csr = tmp_path / "my.csr"
            csr.write_bytes(make_csr([f"host1.{ZONE}"]))
            signed = subprocess.run(
                ["curl", "--fail-with-body", "-sS", "-H", f"Authorization: Bearer {token}",
                 "--data-binary", f"@{csr}", f"{daemon.url}/v1/sign"],
                capture_output=True, timeout=120, check=False,
            )  # fmt: skip
            assert signed.returncode == 0, signed.stdout + signed.stderr
            assert signed.stdout.startswith(b"-----BEGIN CERTIFICATE-----")
            # The service wrote its state as its own user, nothing readable by others.
            state = root / "var/lib/csrproxy"
            for path in state.iterdir():
                st = path.stat()
                assert st.st_uid == uid and not st.st_mode & 0o077, (path, oct(st.st_mode))
        finally:
            daemon.stop()
