"""The status page in a real browser: headless Chromium loads it from a running daemon.

The rendered text is checked and a screenshot kept as an artifact of the run
(``$CSRPROXY_ARTIFACTS``, default ``artifacts/`` in the checkout).
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from csrproxy.testing.browser import CHROMIUM, dump_dom, screenshot
from csrproxy.testing.daemon import Csrproxy, start_csrproxy
from csrproxy.testing.pebble import start_pebble
from csrproxy.testing.ports import free_udp_tcp_port
from csrproxy.web.auth import token_hash
from tests.conftest import ZONE, need
from tests.support.api import post_sign
from tests.support.keys import make_csr

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "status-page-token"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Csrproxy]:
    need("/usr/bin/pebble")
    if not shutil.which(CHROMIUM):
        pytest.skip("chromium is not installed (scripts/install-system-deps installs it)")
    work = tmp_path_factory.mktemp("status")
    tokens = work / "status-tokens"
    tokens.write_text(token_hash(TOKEN) + "\n")
    dns_port = free_udp_tcp_port()
    with start_pebble(str(work / "pebble"), f"127.0.0.1:{dns_port}") as pebble:
        overrides = {"status": {"enabled": True, "tokens_file": str(tokens)}}
        with start_csrproxy(
            str(work / "d"), pebble, dns_port, ZONE, overrides=overrides
        ) as running:
            yield running


def test_the_page_renders_in_chromium(daemon: Csrproxy) -> None:
    code, body = post_sign(daemon, make_csr([f"seen.{ZONE}"]))
    assert code == 200, body
    host = daemon.url.removeprefix("http://")
    # The token as HTTP Basic's password, what a browser sends after asking.
    url = f"http://status:{TOKEN}@{host}/status"
    text = dump_dom(url)
    for expected in ("csrproxy", "Readiness", "Certificate authorities", "my-account",
                     "Orders in flight", "Last failures", "Renewals due in the next 7 days",
                     "NOERROR"):  # fmt: skip
        assert expected in text, (expected, text[:3000])
    # Without the token Chromium gets 401 and would ask for it: nothing of the page shows.
    assert "Readiness" not in dump_dom(f"http://{host}/status")
    try:
        urllib.request.urlopen(f"{daemon.url}/status", timeout=10)
        raise AssertionError("the page answered without a token")
    except urllib.error.HTTPError as e:
        assert e.code == 401 and e.headers["WWW-Authenticate"].startswith("Basic"), e
    artifacts = Path(os.environ.get("CSRPROXY_ARTIFACTS", str(ROOT / "artifacts")))
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "status-page.png"
    screenshot(url, str(shot))
    assert shot.stat().st_size > 10_000
    print(f"status page screenshot: {shot} ({shot.stat().st_size} bytes)")
