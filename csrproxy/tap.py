"""``twistd csrproxy``: options and makeService (the one place that takes the global reactor).

SIGHUP, as daemons take it: the log file is reopened (for logrotate, with twistd's
``--logfile``) and ``[api] tokens_file`` read again, and one line logs what was done;
a tokens file that cannot be used keeps the tokens in use.  SIGTERM and SIGINT stay
twistd's: a clean stop.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

from twisted.application.service import IService, Service
from twisted.logger import Logger, globalLogPublisher
from twisted.python import usage
from twisted.python.logfile import BaseLogFile

from csrproxy.config import Config, config_from_environment, load_config, uses_legacy_environment
from csrproxy.errors import ConfigError

log = Logger()

DEFAULT_CONFIG = "/etc/csrproxy/csrproxy.toml"


class Options(usage.Options):
    synopsis = "--config FILE"
    longdesc = (
        "Sign CSRs with an ACME CA (RFC 8555), answering dns-01 challenges from "
        "csrproxy's own authoritative DNS server. See README.md for the configuration."
    )
    optParameters = [
        [
            "config",
            "c",
            None,
            f"Path of the TOML configuration file [default: {DEFAULT_CONFIG}; without it and "
            "with CSR_PROXY_* variables set, those configure csrproxy like the original].",
        ],
    ]

    def postOptions(self) -> None:
        try:
            if self["config"] is None and uses_legacy_environment(os.environ):
                self.loaded: Config = config_from_environment(os.environ)
            else:
                self.loaded = load_config(self["config"] or DEFAULT_CONFIG)
        except ConfigError as e:
            # One clear line and a non-zero exit, not a usage dump or a traceback.
            sys.stderr.write(f"csrproxy: configuration error: {e}\n")
            raise SystemExit(2) from None


def reopen_log_files() -> list[str]:
    """Reopen the files twistd logs to (``--logfile``); their paths.

    twistd keeps no public handle on its ``LogFile``: it is found among the global log
    publisher's observers.  Logging to stdout (``-n``, systemd's journal) or syslog leaves
    nothing to reopen.
    """
    reopened = []
    for observer in getattr(globalLogPublisher, "_observers", ()):
        out = getattr(observer, "_outFile", None)
        if isinstance(out, BaseLogFile):
            out.reopen()
            reopened.append(str(out.path))
    return reopened


class HangupService(Service):
    """Handles SIGHUP while it runs: reopens the log files and re-reads the tokens file.

    ``reload_tokens`` returns the number of tokens now accepted, or raises
    :class:`ConfigError` or ``ValueError`` (the tokens in use stay); None when there is
    no tokens file.
    The signal handler only hands the work to the reactor thread.
    """

    def __init__(
        self,
        reactor: Any,
        reload_tokens: Callable[[], int] | None,
        tokens_file: str | None = None,
        reopen_logs: Callable[[], list[str]] = reopen_log_files,
    ) -> None:
        self.reactor = reactor
        self.reload_tokens = reload_tokens
        self.tokens_file = tokens_file
        self.reopen_logs = reopen_logs
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._previous = signal.signal(signal.SIGHUP, self._received)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        signal.signal(signal.SIGHUP, self._previous or signal.SIG_DFL)

    def _received(self, signum: int, frame: FrameType | None) -> None:
        self.reactor.callFromThread(self.hangup)

    def hangup(self) -> None:
        """Do what SIGHUP asks, and log one line saying what was done."""
        failed = False
        try:
            # First, so that the line below goes to the new file.
            logs = ", ".join(self.reopen_logs()) or "none (not logging to a file)"
            logs = f"log files reopened: {logs}"
        except OSError as e:
            failed, logs = True, f"log file not reopened: {e}"
        if self.reload_tokens is None:
            tokens = "no tokens file"
        else:
            try:
                tokens = f"tokens file {self.tokens_file} read: {self.reload_tokens()} tokens"
            except (ConfigError, ValueError) as e:
                failed = True
                tokens = f"tokens file not read, the tokens in use stay: {e}"
        if failed:
            log.error("SIGHUP: {tokens}; {logs}", tokens=tokens, logs=logs)
        else:
            log.info("SIGHUP: {tokens}; {logs}", tokens=tokens, logs=logs)


def makeService(options: Options) -> IService:
    # A SIGHUP while the state loads would end the process unlogged (its default action):
    # ignore it until HangupService takes it over.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from twisted.internet import reactor

    from csrproxy.http import make_http_client
    from csrproxy.service import build_service

    config: Config = options.loaded
    checkpoint = None
    if os.environ.get("CSRPROXY_CRASH_AT"):
        # The crash tests' knob: only then is the test kit imported.
        from csrproxy.testing.crashpoints import crash_checkpoint_from_env

        try:
            checkpoint = crash_checkpoint_from_env(os.environ)
        except ValueError as e:
            sys.stderr.write(f"csrproxy: {e}\n")
            raise SystemExit(2) from None
    try:
        http = make_http_client(reactor, config.acme.ca_certs)
        # A fallback CA with ca_certs of its own gets a client that trusts them.
        service = build_service(
            config, reactor, http, checkpoint, lambda cafile: make_http_client(reactor, cafile)
        )
    except ConfigError as e:
        sys.stderr.write(f"csrproxy: configuration error: {e}\n")
        raise SystemExit(2) from None
    hangup = HangupService(reactor, service.reload_tokens, config.api.tokens_file)
    hangup.setServiceParent(service)  # type: ignore[no-untyped-call]
    return service


__all__ = ["HangupService", "Options", "makeService", "reopen_log_files"]
