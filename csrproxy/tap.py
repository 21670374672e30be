"""``twistd csrproxy``: options and makeService (the one place that takes the global reactor)."""

from __future__ import annotations

import os
import sys

from twisted.application.service import IService
from twisted.python import usage

from csrproxy.config import Config, config_from_environment, load_config, uses_legacy_environment
from csrproxy.errors import ConfigError

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


def makeService(options: Options) -> IService:
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
        return build_service(config, reactor, http, checkpoint)
    except ConfigError as e:
        sys.stderr.write(f"csrproxy: configuration error: {e}\n")
        raise SystemExit(2) from None


__all__ = ["Options", "makeService"]
