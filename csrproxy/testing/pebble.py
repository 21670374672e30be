"""pebble (Debian ``pebble``), the ACME test CA, on free loopback ports."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from csrproxy.testing.ports import free_port
from csrproxy.testing.processes import Daemon, https_get, retrying, spawn
from csrproxy.testing.tls import make_tls_files

PEBBLE_BIN = "/usr/bin/pebble"
PEBBLE_ENV_DEFAULTS = {
    "PEBBLE_VA_NOSLEEP": "1",
    "PEBBLE_WFE_NONCEREJECT": "0",
    "PEBBLE_AUTHZREUSE": "0",
}


@dataclass(eq=False)
class Pebble(Daemon):
    directory: str = ""  # https://127.0.0.1:PORT/dir
    ca_cert: str = ""  # PEM of the throwaway CA that signed pebble's HTTPS cert
    management: str = ""  # https://127.0.0.1:MPORT
    cert_path: str = ""  # pebble's HTTPS leaf (127.0.0.1, ::1, localhost): reusable by proxies
    key_path: str = ""
    ca_key: str = ""
    config_path: str = ""
    dns_server: str = ""

    def _mgmt(self, path: str) -> bytes:
        return https_get(self.management + path, self.ca_cert)

    def root_pem(self, chain: int = 0) -> bytes:
        """The issuing root of chain ``chain`` (0 = default); it changes at every start."""
        return self._mgmt(f"/roots/{chain}")

    def intermediate_pem(self, chain: int = 0) -> bytes:
        return self._mgmt(f"/intermediates/{chain}")


def start_pebble(
    workdir: str,
    dns_server: str,
    *,
    env: Mapping[str, str] | None = None,
    eab_keys: Mapping[str, str] | None = None,
    validity_seconds: int | None = None,
    extra_config: Mapping[str, Any] | None = None,
    timeout: float = 20,
) -> Pebble:
    """Start pebble on free loopback ports; its dns-01 validator asks ``dns_server`` (host:port).

    ``env`` overrides PEBBLE_VA_NOSLEEP=1, PEBBLE_WFE_NONCEREJECT=0, PEBBLE_AUTHZREUSE=0.
    ``eab_keys`` (kid -> base64url HMAC key) turns on externalAccountBindingRequired.
    ``extra_config`` is merged last into the ``"pebble"`` JSON object.
    """
    return retrying(
        lambda: _start_pebble(
            workdir, dns_server, env, eab_keys, validity_seconds, extra_config, timeout
        )
    )


def _start_pebble(
    workdir: str,
    dns_server: str,
    env: Mapping[str, str] | None,
    eab_keys: Mapping[str, str] | None,
    validity_seconds: int | None,
    extra_config: Mapping[str, Any] | None,
    timeout: float,
) -> Pebble:
    os.makedirs(workdir, exist_ok=True)
    ca_cert, ca_key, cert, key = make_tls_files(os.path.join(workdir, "tls"))
    port, mport = free_port(), free_port()
    conf: dict[str, Any] = {
        "listenAddress": f"127.0.0.1:{port}",
        "managementListenAddress": f"127.0.0.1:{mport}",
        "certificate": cert,
        "privateKey": key,
        "httpPort": free_port(),
        "tlsPort": free_port(),
        "ocspResponderURL": "",
        "externalAccountBindingRequired": bool(eab_keys),
        "externalAccountMACKeys": dict(eab_keys or {}),
    }
    if validity_seconds is not None:
        conf["certificateValidityPeriod"] = validity_seconds
    conf.update(extra_config or {})
    config_path = os.path.join(workdir, "pebble-config.json")
    with open(config_path, "w") as f:
        json.dump({"pebble": conf}, f, indent=2)
    penv = {**os.environ, **PEBBLE_ENV_DEFAULTS, **(env or {})}
    log_path = os.path.join(workdir, "pebble.log")
    proc = spawn([PEBBLE_BIN, "-config", config_path, "-dnsserver", dns_server], log_path, penv)
    peb = Pebble(
        log_path=log_path,
        directory=f"https://{conf['listenAddress']}/dir",
        management=f"https://{conf['managementListenAddress']}",
        ca_cert=ca_cert,
        cert_path=cert,
        key_path=key,
        ca_key=ca_key,
        config_path=config_path,
        dns_server=dns_server,
    )
    peb.adopt(
        proc,
        lambda: "newNonce" in json.loads(https_get(peb.directory, ca_cert, 1)),
        "pebble",
        timeout,
    )
    return peb
