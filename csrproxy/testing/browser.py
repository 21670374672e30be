"""Headless Chromium (Debian ``chromium``) kept on loopback: the status page's browser test.

Each call runs one ``chromium --headless`` with a throwaway profile and every background
fetch turned off (no networking of its own, component updates, sync, extensions, first-run
pages, crash reports); its proxy is a closed loopback port, so anything but loopback (which
Chromium never proxies) goes nowhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

from csrproxy.testing.ports import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

FLAGS = (
    "--headless=new",
    "--disable-gpu",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-breakpad",
    "--disable-domain-reliability",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
    "--metrics-recording-only",
    "--password-store=basic",
    "--window-size=1280,1600",
)


def chromium(args: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    """Run headless Chromium with ``args`` (e.g. ``--dump-dom URL``) and a fresh profile."""
    profile = tempfile.mkdtemp(prefix="csrproxy-chromium-")
    # A port nobody listens on: whatever Chromium would fetch beyond loopback fails at once.
    closed = free_port("tcp")
    argv = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--proxy-server=127.0.0.1:{closed}"]
    if os.geteuid() == 0:
        argv.append("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    try:
        return subprocess.run(
            [*argv, *args], capture_output=True, timeout=timeout, check=False, env=_env()
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def dump_dom(url: str) -> str:
    """The document ``url`` renders to, as Chromium serialises it."""
    done = chromium(["--dump-dom", url])
    if done.returncode != 0:
        raise RuntimeError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]!r}")
    return done.stdout.decode("utf-8", "replace")


def screenshot(url: str, path: str) -> None:
    """A PNG of ``url`` at 1280x1600, written to ``path``."""
    done = chromium([f"--screenshot={path}", url])
    if done.returncode != 0 or not os.path.exists(path):
        raise RuntimeError(f"chromium failed ({done.returncode}): {done.stderr[-2000:]!r}")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env["HOME"] = tempfile.gettempdir()
    return env


__all__ = ["CHROMIUM", "chromium", "dump_dom", "screenshot"]
