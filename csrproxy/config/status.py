"""The ``[status]`` section: the operator's status page."""

from __future__ import annotations

from pathlib import Path

from csrproxy.config.model import StatusConfig
from csrproxy.config.reader import Table


def parse_status(status: Table) -> StatusConfig:
    enabled = status.get("enabled", bool, StatusConfig.enabled)
    tokens_file = status.get("tokens_file", str, StatusConfig.tokens_file)
    if enabled and tokens_file is None:
        raise status.error("tokens_file", "the status page needs a tokens file (who may see it)")
    if tokens_file is not None and not Path(tokens_file).is_file():
        raise status.error("tokens_file", f"no such file: {tokens_file}")
    config = StatusConfig(
        enabled=enabled,
        tokens_file=tokens_file,
        due_days=status.positive("due_days", StatusConfig.due_days),
    )
    status.done()
    return config
