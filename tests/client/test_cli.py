"""csrproxy-client on the command line: exit codes, the progress line on a terminal only,
and one run against the real daemon and pebble."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from csrproxy.client import TerminalProgress, main
from csrproxy.client.chains import dns_names
from csrproxy.client.cli import log as client_log
from csrproxy.client.keys import load_key, same_key
from tests.client.fakes import NAME, TTY, URL, FakeClock, FakeServer, cli, problem


def test_exit_codes(server: FakeServer, clock: FakeClock, tmp_path: Path) -> None:
    d = str(tmp_path / "tls")
    assert cli(server, clock, "issue", "--url", URL, "--dir", d, "--name", NAME)[0] == 0
    # usage
    assert cli(server, clock, "issue", "--dir", d)[0] == 2
    assert cli(server, clock, "issue", "--url", URL, "--dir", d, "--key-type", "dsa")[0] == 2
    assert cli(server, clock, "issue", "--url", "ftp://x", "--dir", d)[0] == 2
    assert cli(server, clock, "renew", "--dir", str(tmp_path / "nothing"))[0] == 2
    assert cli(server, clock, "frobnicate")[0] == 2
    assert cli(server, clock, "issue", "--url", URL, "--dir", d, "--token-file", "/nope")[0] == 2
    # refused
    server.canned["POST /v1/sign"] = [problem(403, "name-not-allowed")]
    code, err = cli(server, clock, "issue", "--url", URL, "--dir", d, "--name", "x.example.org")
    assert code == 1 and "403" in err and "name-not-allowed" in err
    # network
    server.down = True
    code, err = cli(server, clock, "issue", "--url", URL, "--dir", d, "--name", NAME)
    assert code == 3 and "cannot reach" in err


def test_progress_line_only_on_a_terminal(
    server: FakeServer, clock: FakeClock, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tty = TTY()
    args = ["issue", "--url", URL, "--dir", str(tmp_path), "--name", NAME]
    assert main(args, transport=server, now=clock.now, sleep=clock.sleep, stderr=tty) == 0
    assert "\r\x1b[K waiting for the CA… 0s" in tty.getvalue()
    assert "SANs:" in capsys.readouterr().out
    plain = io.StringIO()
    assert main(args, transport=server, now=clock.now, sleep=clock.sleep, stderr=plain) == 0
    assert "\r" not in plain.getvalue() and "asking for" in plain.getvalue()


def test_terminal_progress_redraws_and_clears() -> None:
    tty = TTY()
    progress = TerminalProgress(tty, interval=3600)
    progress("waiting for the CA")
    progress("waiting for the CA (order accepted)")
    progress("")
    out = tty.getvalue()
    assert out.count("\r\x1b[K") == 3 and out.endswith("\r\x1b[K")
    assert "order accepted" in out


@pytest.fixture
def no_client_log_handlers() -> Iterator[None]:
    yield
    assert not client_log.handlers


@pytest.mark.integration
def test_cli_issue_against_the_daemon(
    daemon: Any, pebble: Any, tmp_path: Path, no_client_log_handlers: None
) -> None:
    from tests.conftest import ZONE

    root = tmp_path / "root.pem"
    root.write_bytes(pebble.root_pem())
    d = tmp_path / "tls"
    name = f"client-cli.{ZONE}"
    argv = ["issue", "--url", daemon.url, "--dir", str(d), "--name", name, "--root", str(root)]
    assert main(argv) == 0
    key = load_key(d / "key.pem")
    chain = x509.load_pem_x509_certificates((d / "cert.pem").read_bytes())
    assert same_key(chain[0], key) and dns_names(chain[0]) == [name]
    assert x509.load_pem_x509_certificates((d / "chain.pem").read_bytes()) == chain[1:]
    state = json.loads((d / "csrproxy.json").read_text())
    assert state["url"] == daemon.url and state["names"] == [name]
    # Again: the same key, and the server's cache answers.
    assert main(argv) == 0
    assert load_key(d / "key.pem").private_numbers() == key.private_numbers()
