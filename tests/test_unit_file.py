"""The systemd unit keeps its file-descriptor limit well above the connection caps."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from csrproxy.config.model import APIConfig
from csrproxy.dns.limits import TCP_MAX_CONNECTIONS

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "csrproxy.service"


def directives() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "[")) and "=" in line:
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_fd_limit_is_well_above_the_caps() -> None:
    limit = int(directives()["LimitNOFILE"][-1])
    caps = APIConfig.max_connections + TCP_MAX_CONNECTIONS
    # Each connection is one descriptor; the store, the CA's pool and logs need a few more.
    assert limit >= 4 * caps, (limit, caps)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_exposure_is_at_most_2() -> None:
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [line for line in done.stdout.splitlines() if "Overall exposure level" in line]
    assert lines, done.stdout + done.stderr
    score = float(lines[-1].split("level for")[1].split(":")[1].split()[0])
    assert score <= 2.0, lines[-1]
