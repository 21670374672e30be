"""The typed configuration, from a TOML file or the original's ``CSR_PROXY_*`` environment.

Every mistake is reported as one :class:`~csrproxy.errors.ConfigError` naming
the key (``section.key``) and what is wrong with it.  Nothing here imports
Twisted.

Modules: :mod:`~csrproxy.config.model` (the dataclasses),
:mod:`~csrproxy.config.reader` (typed reads of one TOML table),
one parser per section (:mod:`~csrproxy.config.acme`, ``api``, ``dns``,
``policy``, ``state``, ``renewal``), :mod:`~csrproxy.config.load` (the file and
the document) and :mod:`~csrproxy.config.legacy` (the environment).
"""

from csrproxy.config.legacy import config_from_environment, uses_legacy_environment
from csrproxy.config.load import load_config, parse_config
from csrproxy.config.model import (
    ACMEConfig,
    APIConfig,
    Config,
    DNSConfig,
    Network,
    PolicyConfig,
    PowerDNSConfig,
    RenewalConfig,
    StateConfig,
)

__all__ = [
    "ACMEConfig",
    "APIConfig",
    "Config",
    "DNSConfig",
    "Network",
    "PolicyConfig",
    "PowerDNSConfig",
    "RenewalConfig",
    "StateConfig",
    "config_from_environment",
    "load_config",
    "parse_config",
    "uses_legacy_environment",
]
