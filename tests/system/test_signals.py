"""SIGHUP re-reads the tokens file and reopens the log file, logging what it did; SIGTERM
stops cleanly.  Unit tests of the pieces, then ``twistd -n csrproxy --logfile`` for real."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from csrproxy.errors import ConfigError, Unauthorized
from csrproxy.tap import HangupService
from csrproxy.testing.daemon import Csrproxy, demo_config, to_toml, twistd_argv, wait_ready
from csrproxy.testing.pebble import Pebble, start_pebble
from csrproxy.testing.ports import free_port, free_udp_tcp_port
from csrproxy.web.auth import ClientGate, load_tokens, reload_tokens, token_hash
from tests.conftest import ZONE

TOKEN_A = "token-a-" + "a" * 32
TOKEN_B = "token-b-" + "b" * 32


class RecordingReactor:
    """Records what is handed to the reactor thread instead of running it."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], None]] = []

    def callFromThread(self, f: Callable[[], None]) -> None:
        self.calls.append(f)


class TokensReloadTests(SynchronousTestCase):
    def setUp(self) -> None:
        work = tempfile.mkdtemp(prefix="csrproxy-test-tokens-")
        self.addCleanup(shutil.rmtree, work, True)
        self.path = Path(work) / "tokens"
        self.path.write_text(token_hash(TOKEN_A) + "\n")
        self.gate = ClientGate(load_tokens(str(self.path)))

    def test_new_file_replaces_the_tokens(self) -> None:
        self.path.write_text(f"{token_hash(TOKEN_A)}\n{token_hash(TOKEN_B)} x.{ZONE}\n")
        self.assertEqual(reload_tokens(self.gate, str(self.path)), 2)
        self.gate.check_token(f"Bearer {TOKEN_B}")
        self.path.write_text(token_hash(TOKEN_B) + "\n")
        self.assertEqual(reload_tokens(self.gate, str(self.path)), 1)
        with self.assertRaises(Unauthorized):
            self.gate.check_token(f"Bearer {TOKEN_A}")

    def test_bad_file_keeps_the_tokens(self) -> None:
        for text in ("sha256:nothex\n", "# no token at all\n"):
            self.path.write_text(text)
            with self.assertRaises(ConfigError):
                reload_tokens(self.gate, str(self.path))
            self.gate.check_token(f"Bearer {TOKEN_A}")
        self.path.unlink()
        with self.assertRaises(ConfigError):
            reload_tokens(self.gate, str(self.path))
        self.gate.check_token(f"Bearer {TOKEN_A}")

    def test_no_tokens_never_turn_authentication_off(self) -> None:
        with self.assertRaises(ValueError):
            self.gate.replace_tokens([])
        self.gate.check_token(f"Bearer {TOKEN_A}")


class HangupServiceTests(SynchronousTestCase):
    def service(self, reload: Callable[[], int] | None, logs: list[str]) -> HangupService:
        return HangupService(RecordingReactor(), reload, "/etc/csrproxy/tokens", lambda: logs)

    def test_one_line_says_what_was_done(self) -> None:
        with capturedLogs() as events:
            self.service(lambda: 3, ["/var/log/csrproxy.log"]).hangup()
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.info)
        line = event["log_format"].format(**event)
        self.assertIn("tokens file /etc/csrproxy/tokens read: 3 tokens", line)
        self.assertIn("log files reopened: /var/log/csrproxy.log", line)

    def test_a_bad_tokens_file_is_an_error_line(self) -> None:
        def bad() -> int:
            raise ConfigError("api.tokens_file", "tokens:2: expected sha256:<64 hex>")

        with capturedLogs() as events:
            self.service(bad, []).hangup()
        [event] = events
        self.assertEqual(event["log_level"], LogLevel.error)
        line = event["log_format"].format(**event)
        self.assertIn("the tokens in use stay", line)
        self.assertIn("tokens:2", line)
        self.assertIn("not logging to a file", line)

    def test_without_tokens_file(self) -> None:
        with capturedLogs() as events:
            self.service(None, []).hangup()
        [event] = events
        self.assertIn("no tokens file", event["log_format"].format(**event))

    def test_handler_hands_the_work_to_the_reactor_and_goes_away_on_stop(self) -> None:
        before = signal.getsignal(signal.SIGHUP)
        reloads: list[int] = []

        def reload() -> int:
            reloads.append(1)
            return 1

        service = self.service(reload, [])
        service.startService()
        try:
            handler = signal.getsignal(signal.SIGHUP)
            assert callable(handler)
            handler(signal.SIGHUP, None)  # what the signal does, without sending one
            self.assertEqual(reloads, [], "work done inside the signal handler")
            reactor = service.reactor
            assert isinstance(reactor, RecordingReactor)
            [call] = reactor.calls
            with capturedLogs():
                call()
            self.assertEqual(reloads, [1])
        finally:
            service.stopService()
        self.assertEqual(signal.getsignal(signal.SIGHUP), before)


# -- the daemon -------------------------------------------------------------------


@pytest.fixture(scope="module")
def hup_dns_port() -> int:
    return free_udp_tcp_port()


@pytest.fixture(scope="module")
def hup_pebble(tmp_path_factory: pytest.TempPathFactory, hup_dns_port: int) -> Iterator[Pebble]:
    with start_pebble(str(tmp_path_factory.mktemp("pebble")), f"127.0.0.1:{hup_dns_port}") as p:
        yield p


def read_order(daemon: Csrproxy, token: str) -> int:
    """The status of reading an unknown order with ``token``: 404 accepted, 401 refused."""
    req = urllib.request.Request(
        daemon.url + "/v1/orders/no-such-order", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def wait_for_line(path: Path, text: str, daemon: Csrproxy) -> str:
    """The first line of ``path`` holding ``text``, waiting up to 10 s."""
    pause = threading.Event()
    for _ in range(200):
        if path.exists():
            for line in path.read_text(errors="replace").splitlines():
                if text in line:
                    return line
        assert daemon.proc.poll() is None, f"csrproxy exited ({daemon.proc.returncode})"
        pause.wait(0.05)
    raise AssertionError(f"no {text!r} in {path}:\n{daemon.log_tail()}")


@pytest.mark.integration
def test_sighup_reloads_tokens_and_reopens_the_log(
    tmp_path: Path, hup_pebble: Pebble, hup_dns_port: int
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(token_hash(TOKEN_A) + "\n")
    api_port = free_port()
    config = demo_config(tmp_path, hup_pebble, hup_dns_port, ZONE, api_port)
    config["api"]["tokens_file"] = str(tokens)
    path = tmp_path / "csrproxy.toml"
    path.write_text(to_toml(config))
    log = tmp_path / "csrproxy.log"
    argv = twistd_argv(path)
    argv.insert(argv.index("-n") + 1, f"--logfile={log}")
    with open(tmp_path / "stdout", "ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, env=dict(os.environ)
        )
    with Csrproxy(proc, f"http://127.0.0.1:{api_port}", path, log) as daemon:
        assert wait_ready(daemon, 30), daemon.log_tail()
        assert read_order(daemon, TOKEN_A) == 404
        assert read_order(daemon, TOKEN_B) == 401

        # logrotate moves the file, then sends SIGHUP; a token was added meanwhile.
        log.rename(tmp_path / "csrproxy.log.1")
        tokens.write_text(f"{token_hash(TOKEN_A)}\n{token_hash(TOKEN_B)}\n")
        proc.send_signal(signal.SIGHUP)
        line = wait_for_line(log, "SIGHUP:", daemon)
        assert f"tokens file {tokens} read: 2 tokens" in line, line
        assert f"log files reopened: {log}" in line, line
        assert proc.poll() is None
        assert read_order(daemon, TOKEN_B) == 404
        assert read_order(daemon, TOKEN_A) == 404

        # A broken file: logged, and the tokens in use stay.
        tokens.write_text("sha256:not-a-digest\n")
        proc.send_signal(signal.SIGHUP)
        line = wait_for_line(log, "tokens file not read", daemon)
        assert "the tokens in use stay" in line, line
        assert read_order(daemon, TOKEN_B) == 404

        # SIGTERM as before: a clean stop, the exit status saying SIGTERM (as twistd's is).
        proc.terminate()
        assert proc.wait(15) == -signal.SIGTERM
    text = log.read_text()
    assert "Received SIGTERM" in text and "Server Shut Down." in text
