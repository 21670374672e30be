"""Publishing dns-01 TXT values into an existing PowerDNS through its HTTP API.

PowerDNS's ``REPLACE`` replaces a whole rrset, so this module keeps the
current multiset of values for each ``_acme-challenge`` name in memory and
always writes the whole set: two orders with values on one name (a wildcard
and its base name) never overwrite each other.  Writes for one name are
serialised and coalesced; writes for different names run in parallel.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import quote

from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail, succeed
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    DNSLookupError,
    TimeoutError,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import RequestNotSent  # not re-exported by twisted.web.client
from twisted.web.client import RequestTransmissionFailed, ResponseFailed, readBody
from twisted.web.iweb import IResponse

from csrproxy.challenges.powerdns_errors import (
    BACKEND,
    PowerDNSAPIError,
    Transient,
    http_error,
    reason_of,
)
from csrproxy.challenges.zone import CHALLENGE_LABEL, challenge_name
from csrproxy.config import PowerDNSConfig
from csrproxy.dns.records import caa_issuer_value
from csrproxy.retry import RetryTimer

log = Logger()

#: How a request fails when PowerDNS cannot be reached or the exchange broke off, all worth
#: a retry.  A connect cancelled by our timeout fails with ConnectingCancelledError.
_UNREACHABLE = (
    ConnectError,
    ConnectingCancelledError,
    DNSLookupError,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    TimeoutError,
    CancelledError,
)


@dataclass
class _NameState:
    values: Counter[str] = field(default_factory=Counter)
    #: Callers waiting for the next write of this name (they changed it after the current one).
    waiters: list[Deferred[None]] = field(default_factory=list)
    busy: bool = False


def _quote_txt(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


class PowerDNSPublisher:
    """Puts challenge TXT values into a PowerDNS zone through its HTTP API.

    ``publish``/``unpublish`` fire once PowerDNS has accepted a write that
    includes (or no longer includes) the value, and fail with
    :class:`PowerDNSAPIError` (a :class:`PublishError`) otherwise.  Transient
    failures (unreachable, timeouts, 5xx) are retried with capped exponential
    back-off until ``config.api_timeout``; 4xx answers are not retried.

    A value whose ``publish`` failed still counts until it is unpublished
    (PowerDNS may have applied the write): callers unpublish every value they
    tried to publish, as ``obtain_chain`` does.

    ``on_change``, if given, is called with the set of record names (no
    trailing dot) that may hold our records in PowerDNS whenever that set
    changes: a name is added before its first write and removed only after a
    DELETE succeeded, so a recorded set lets a later run clean up after a crash
    (see :meth:`remove_names`).
    """

    backend = BACKEND

    def __init__(
        self,
        clock: IReactorTime,
        http: HTTPClient,
        config: PowerDNSConfig,
        *,
        on_change: Callable[[frozenset[str]], None] | None = None,
        request_timeout: float = 10.0,
        retry_first: float = 0.25,
        retry_cap: float = 5.0,
    ) -> None:
        if not config.zone:
            raise ValueError("PowerDNSConfig.zone is empty")
        self.clock = clock
        self.http = http
        self.config = config
        self.zone = config.zone.rstrip(".").lower()
        self.request_timeout = request_timeout
        self.retry_first = retry_first
        self.retry_cap = retry_cap
        self.zone_url = (
            f"{config.api_url.rstrip('/')}/api/v1/servers/{quote(config.server_id, safe='')}"
            f"/zones/{quote(self.zone, safe='')}."
        )
        self._on_change = on_change
        self._names: dict[str, _NameState] = {}
        self._live: set[str] = set()
        # The apex CAA set last asked for, and the calls waiting for a write of it.
        self._caa_wanted: list[str] = []
        self._caa_waiters: list[Deferred[None]] = []
        self._caa_busy = False

    def __repr__(self) -> str:
        # The config's repr hides the key; keep ours free of it as well.
        return f"<PowerDNSPublisher {self.zone_url}>"

    @property
    def live_names(self) -> frozenset[str]:
        """Record names that may hold our values in PowerDNS right now."""
        return frozenset(self._live)

    def values(self, name: str) -> list[str]:
        """The distinct values we want served at record ``name`` (sorted)."""
        state = self._names.get(name.rstrip(".").lower())
        return sorted(state.values) if state else []

    # -- the DNS01Responder interface -------------------------------------

    def publish(self, identifier: str, value: str) -> Deferred[None]:
        name = challenge_name(identifier)
        problem = self._check(name) or self._check_value(value)
        if problem is not None:
            return fail(problem)
        state = self._names.setdefault(name, _NameState())
        state.values[value] += 1
        return self._sync(name, state)

    def unpublish(self, identifier: str, value: str) -> Deferred[None]:
        name = challenge_name(identifier)
        state = self._names.get(name)
        if state is None or state.values[value] <= 0:
            # Never published (or refused before any write): nothing to remove.
            return succeed(None)
        state.values[value] -= 1
        if state.values[value] <= 0:
            del state.values[value]
            return self._sync(name, state)
        # Another order still needs the same value: PowerDNS already has the right set.
        return succeed(None)

    # -- CAA at the apex ----------------------------------------------------

    def set_caa(self, issuers: Sequence[tuple[str, str | None]]) -> Deferred[None]:
        """Replace the CAA RRset at the zone's apex with an ``issue`` and an ``issuewild``
        record per ``(identity, account_url)``, as ``ChallengeZone.set_caa`` serves them;
        fires once PowerDNS accepted the latest set asked for (writes are serialised, and
        one waiting write takes every later call). The apex CAA RRset is csrproxy's from
        then on: CAA records of the operator's there are replaced. Raises ``ValueError``
        for no issuers, a bad identity or URL."""
        if not issuers:
            raise ValueError("no CA to name in CAA")
        contents: list[str] = []
        for identity, account_url in issuers:
            value = caa_issuer_value(identity, account_url).decode("ascii")
            contents.extend(f'0 {tag} "{value}"' for tag in ("issue", "issuewild"))
        self._caa_wanted = sorted(set(contents))
        waiter: Deferred[None] = Deferred()
        self._caa_waiters.append(waiter)
        if not self._caa_busy:
            self._write_caa()
        return waiter

    def _write_caa(self) -> None:
        self._caa_busy = True
        waiters, self._caa_waiters = self._caa_waiters, []

        def done(result: Failure | None) -> None:
            for waiter in waiters:
                if not waiter.called:
                    if isinstance(result, Failure):
                        waiter.errback(result)
                    else:
                        waiter.callback(None)
            if self._caa_waiters:
                self._write_caa()
            else:
                self._caa_busy = False

        Deferred.fromCoroutine(self._write(self.zone, self._caa_wanted, "CAA")).addBoth(done)

    # -- start-up clean-up ------------------------------------------------

    def remove_names(self, names: Iterable[str]) -> Deferred[None]:
        """Delete the ``_acme-challenge`` rrsets ``names`` (left by an earlier run).

        A name that currently has values of ours is rewritten with exactly
        those instead.  Fails with the first :class:`PublishError` after every
        name was tried; names outside our zone, or not ``_acme-challenge``
        names, are refused without any request.
        """
        wanted: list[str] = []
        for raw in names:
            name = raw.rstrip(".").lower()
            problem = self._check(name)
            if problem is None and not name.startswith(CHALLENGE_LABEL + "."):
                problem = PowerDNSAPIError(
                    "outside-zone", f"refusing to remove {name}.: not an {CHALLENGE_LABEL} name"
                )
            if problem is not None:
                return fail(problem)
            if name not in wanted:
                wanted.append(name)
        return Deferred.fromCoroutine(self._remove_all(wanted))

    async def _remove_all(self, names: list[str]) -> None:
        results = await DeferredList(
            [self._sync(n, self._names.setdefault(n, _NameState())) for n in names],
            consumeErrors=True,
        )
        for ok, result in results:
            if not ok:
                cast(Failure, result).raiseException()

    # -- per-name write queue ---------------------------------------------

    def _check(self, name: str) -> PowerDNSAPIError | None:
        if name == self.zone or name.endswith("." + self.zone):
            return None
        return PowerDNSAPIError(
            "outside-zone", f"{name}. is not inside the PowerDNS zone {self.zone}."
        )

    def _check_value(self, value: str) -> PowerDNSAPIError | None:
        if 0 < len(value) <= 255 and value.isascii() and value.isprintable():
            return None
        return PowerDNSAPIError("rejected", f"not a usable TXT value: {value[:60]!r}")

    def _sync(self, name: str, state: _NameState) -> Deferred[None]:
        """A Deferred for the first write of ``name`` that starts after now."""
        waiter: Deferred[None] = Deferred()
        state.waiters.append(waiter)
        if not state.busy:
            self._write_next(name, state)
        return waiter

    def _write_next(self, name: str, state: _NameState) -> None:
        state.busy = True
        waiters, state.waiters = state.waiters, []
        values = sorted(state.values)
        if values and name not in self._live:
            self._live.add(name)
            self._changed()

        def done(result: Failure | None) -> None:
            if result is None and not values and name in self._live:
                self._live.discard(name)
                self._changed()
            for waiter in waiters:
                if not waiter.called:  # a caller may have cancelled its wait
                    if isinstance(result, Failure):
                        waiter.errback(result)
                    else:
                        waiter.callback(None)
            if state.waiters:
                self._write_next(name, state)
            else:
                state.busy = False
                if not state.values and self._names.get(name) is state:
                    del self._names[name]

        Deferred.fromCoroutine(self._write(name, values)).addBoth(done)

    def _changed(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change(frozenset(self._live))
            except Exception:
                log.failure("on_change callback failed", backend=BACKEND)

    # -- HTTP ---------------------------------------------------------------

    async def _write(self, name: str, values: list[str], rtype: str = "TXT") -> None:
        """PATCH the whole set ``values`` at ``name`` (DELETE when empty), retrying; TXT
        values are quoted here, another type's are PowerDNS record content already."""
        changetype = "REPLACE" if values else "DELETE"
        rrset: dict[str, Any] = {
            "name": name + ".",
            "type": rtype,
            "ttl": self.config.ttl,
            "changetype": changetype,
        }
        if values:
            rrset["records"] = [
                {"content": _quote_txt(v) if rtype == "TXT" else v, "disabled": False}
                for v in values
            ]
        body = json.dumps({"rrsets": [rrset]}).encode()
        started = self.clock.seconds()
        give_up = started + self.config.api_timeout
        timer = RetryTimer(self.clock, self.retry_first, self.retry_cap, give_up)
        attempt = 0
        while True:
            attempt += 1
            timeout = max(0.001, min(self.request_timeout, give_up - self.clock.seconds()))
            try:
                status, content = await self._patch(body, timeout)
            except Transient as e:
                error = e.error
                status = 0
            else:
                if 200 <= status < 300:
                    log.info(
                        "powerdns {changetype} {name}: HTTP {status} ({count} values)",
                        backend=BACKEND,
                        name=name,
                        status=status,
                        changetype=changetype,
                        count=len(values),
                        attempt=attempt,
                    )
                    return
                error = http_error(name, status, content, self.config.server_id, self.zone)
                if status < 500:
                    log.error(
                        "powerdns {changetype} {name}: HTTP {status}: {detail}",
                        backend=BACKEND,
                        name=name,
                        status=status,
                        changetype=changetype,
                        detail=error.text,
                    )
                    raise error
            delay = timer.next_delay()
            if delay is None:
                waited = self.clock.seconds() - started
                log.error(
                    "powerdns {changetype} {name}: giving up after {attempt} attempts: {detail}",
                    backend=BACKEND,
                    name=name,
                    status=status,
                    changetype=changetype,
                    attempt=attempt,
                    detail=error.text,
                )
                raise PowerDNSAPIError(
                    error.reason,
                    f"{error.text} (gave up after {attempt} attempts in {waited:.1f}s)",
                    error.http_status,
                )
            log.warn(
                "powerdns {changetype} {name}: {detail}; retry in {delay:.2f}s",
                backend=BACKEND,
                name=name,
                status=status,
                changetype=changetype,
                detail=error.text,
                delay=delay,
            )
            await timer.sleep(delay)

    async def _patch(self, body: bytes, timeout: float) -> tuple[int, bytes]:
        """One PATCH of the zone; raises :class:`Transient` when PowerDNS cannot be reached."""
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            call.cancel()

        call = Deferred.fromCoroutine(self._request(body))
        timer = self.clock.callLater(timeout, expire)
        try:
            return await call
        except _UNREACHABLE as e:
            why = f"no answer within {timeout:.1f}s" if timed_out else reason_of(e)
            raise Transient(
                PowerDNSAPIError(
                    "unreachable", f"PowerDNS API at {self.config.api_url} unreachable: {why}"
                )
            ) from e
        finally:
            if timer.active():
                timer.cancel()

    async def _request(self, body: bytes) -> tuple[int, bytes]:
        headers: dict[bytes | str, list[bytes | str]] = {
            "X-API-Key": [self.config.api_key],
            "Content-Type": ["application/json"],
            "Accept": ["application/json"],
            "User-Agent": ["csrproxy/0.1 (+twisted treq)"],
        }
        resp: IResponse = await self.http.request(
            "PATCH",
            self.zone_url,
            data=body,
            headers=headers,
            allow_redirects=False,
        )
        content: bytes = await readBody(resp)
        return resp.code, content
