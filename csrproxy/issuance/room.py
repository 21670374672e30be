"""Which zones have room for new certificates this week: the question ``GET /v1/name``
asks (``[dns] zones``) of the admission's new-names budget, one per registered domain.

The admission answers it through a method it is to have (see :func:`new_names_room`);
until it does, every zone has room, and names go to the first zone as with one zone.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.logger import Logger

from csrproxy.issuance.policy import ZoneRoom

log = Logger()


def new_names_room(admission: object) -> Callable[[str], float | None]:
    """How many new certificates a zone's registered domain has room for this week (None:
    not known, taken as room). ``GET /v1/name`` hands out names in the first zone with
    room, health and metrics show it."""
    # TODO(admission): Admission.new_names_room(name: str) -> float, the new-certificate
    # budget left now (not charged) for the registered domain of ``name`` (a zone's apex),
    # inf when that budget is off; until the admission has it, every zone has room.
    ask = getattr(admission, "new_names_room", None)
    failing: list[bool] = [False]  # one log line until it answers again: asked per request

    def left(origin: str) -> float | None:
        if ask is None:
            return None
        try:
            room = float(ask(origin))
        except Exception:
            if not failing[0]:
                failing[0] = True
                log.failure("the new-names budget of {zone} is unknown", zone=origin)
            return None
        if failing[0]:
            failing[0] = False
            log.info("the new-names budgets are known again")
        return room

    return left


def has_room(left: Callable[[str], float | None]) -> ZoneRoom:
    """The ``GET /v1/name`` question of :func:`new_names_room`'s answer: room for one more
    new certificate, or not known (taken as room)."""
    return lambda origin: (n := left(origin)) is None or n >= 1
