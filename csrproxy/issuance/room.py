"""Which zones have room for new certificates this week: the question ``GET /v1/name``
asks (``[dns] zones``) of the admission's new-names budget, one per registered domain.

The admission answers it (``Admission.new_names_room``; on PostgreSQL
``ClusterAdmission.new_names_room``, this instance's view); an admission without it has
room in every zone, and names go to the first zone as with one zone.
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
    # Admission.new_names_room(name) -> float: the new-certificate budget left now (not
    # charged) for the registered domain of ``name`` (a zone's apex), inf when it is off.
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
