"""Run with only the original csr_proxy's environment variables (a drop-in for its users).

The original (csr-proxy 0.1.0) is configured by ``CSR_PROXY_*`` variables and
signs CSRs whose subject is exactly ``CSR_PROXY_SUBJ``, for that subject's CN,
publishing the dns-01 record through PowerDNS.  :func:`config_from_environment`
builds the same setup as a csrproxy configuration.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from csrproxy.config.load import parse_config
from csrproxy.config.model import Config
from csrproxy.errors import ConfigError

PREFIX = "CSR_PROXY_"
#: The original's variables and their defaults (csr_proxy/config.py).
VARIABLES = {
    "ACME_DIRECTORY": "https://acme-staging-v02.api.letsencrypt.org/directory",
    "EMAIL": "",
    "SUBJ": "",
    "PDNS_API_URL": "",
    "PDNS_API_KEY": "12345",
    "EAB_KID": "",
    "EAB_HMAC": "",
    "API_HOST": "127.0.0.1",
    "API_PORT": "8000",
    "STATE_PATH": "/var/lib/csr-proxy/state.json",
}


def uses_legacy_environment(env: Mapping[str, str]) -> bool:
    """Whether any ``CSR_PROXY_*`` variable is set."""
    return any(k.startswith(PREFIX) for k in env)


def legacy_data(env: Mapping[str, str]) -> dict[str, Any]:
    """The configuration (as parsed TOML) that the original's variables describe."""
    unknown = sorted(k for k in env if k.startswith(PREFIX) and k[len(PREFIX) :] not in VARIABLES)
    if unknown:
        raise ConfigError(
            unknown[0], f"unknown variable (known: {', '.join(PREFIX + v for v in VARIABLES)})"
        )
    v = {k: env.get(PREFIX + k, default) for k, default in VARIABLES.items()}
    subject = v["SUBJ"]
    if not subject.startswith("CN="):
        raise ConfigError(PREFIX + "SUBJ", f"must be a subject starting with CN=, not {subject!r}")
    domain = subject[3:].split(",", 1)[0].strip().lower()
    if not v["PDNS_API_URL"]:
        raise ConfigError(PREFIX + "PDNS_API_URL", "is required (the PowerDNS API URL)")
    if not v["API_PORT"].isdigit():
        raise ConfigError(PREFIX + "API_PORT", f"{v['API_PORT']!r} is not a port number")
    acme: dict[str, Any] = {"directory": v["ACME_DIRECTORY"]}
    if v["EMAIL"]:
        acme["contact"] = [f"mailto:{v['EMAIL']}"]
    if v["EAB_KID"] or v["EAB_HMAC"]:
        acme["eab_kid"] = v["EAB_KID"]
        acme["eab_hmac_key"] = v["EAB_HMAC"]
    state_dir = os.path.dirname(v["STATE_PATH"]) or "."
    return {
        "acme": acme,
        "api": {"listen": [f"tcp:{v['API_PORT']}:interface={v['API_HOST']}"]},
        "dns": {
            "zone": domain,
            "listen": [],
            "backend": "powerdns",
            "powerdns": {
                "api_url": v["PDNS_API_URL"],
                "api_key": v["PDNS_API_KEY"],
                "zone": domain,
                # The original checked nothing over DNS: neither do we, unless told where.
                "check_servers": [],
                "check_propagation": False,
            },
        },
        "policy": {"subject": subject, "names": [domain]},
        "state": {"dir": os.path.join(state_dir, "csrproxy")},
    }


def config_from_environment(env: Mapping[str, str]) -> Config:
    """The :class:`Config` the original's variables describe, checked like a file."""
    return parse_config(legacy_data(env), source="environment (CSR_PROXY_*)")
