"""The ``[state]`` section: where durable state is kept."""

from __future__ import annotations

from csrproxy.config.model import StateConfig
from csrproxy.config.reader import Table


def parse_state(state: Table) -> StateConfig:
    config = StateConfig(
        dir=state.get("dir", str),
        retention_days=state.positive("retention_days", StateConfig.retention_days),
    )
    state.done()
    return config
