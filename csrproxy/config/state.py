"""The ``[state]`` section: where durable state is kept."""

from __future__ import annotations

from csrproxy.config.model import StateConfig
from csrproxy.config.reader import Table


def parse_state(state: Table) -> StateConfig:
    config = StateConfig(dir=state.get("dir", str))
    state.done()
    return config
