"""``twistd csrproxy``: options and makeService (the one place that takes the global reactor)."""

from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.python import usage

from csrproxy.config import Config, load_config
from csrproxy.errors import ConfigError


class Options(usage.Options):
    synopsis = "--config FILE"
    longdesc = (
        "Sign CSRs with an ACME CA (RFC 8555), answering dns-01 challenges from "
        "csrproxy's own authoritative DNS server. See README.md for the configuration."
    )
    optParameters = [
        ["config", "c", "/etc/csrproxy/csrproxy.toml", "Path of the TOML configuration file."],
    ]

    def postOptions(self) -> None:
        try:
            self.loaded: Config = load_config(self["config"])
        except ConfigError as e:
            # One clear line and a non-zero exit, not a usage dump or a traceback.
            sys.stderr.write(f"csrproxy: configuration error: {e}\n")
            raise SystemExit(2) from None


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from csrproxy.http import make_http_client
    from csrproxy.service import build_service

    config: Config = options.loaded
    try:
        http = make_http_client(reactor, config.acme.ca_certs)
        return build_service(config, reactor, http)
    except ConfigError as e:
        sys.stderr.write(f"csrproxy: configuration error: {e}\n")
        raise SystemExit(2) from None


__all__ = ["Options", "makeService"]
