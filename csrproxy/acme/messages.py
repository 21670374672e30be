"""RFC 8555 resources as typed messages, parsed once from the CA's JSON.

Modelled on certbot's ``acme.messages``: the directory, an account, an order, an
authorization, a challenge and a problem document are frozen dataclasses, each built by
its ``from_json``.  Parsing checks what csrproxy relies on (field types, URLs that are
absolute http(s) URLs, statuses RFC 8555 defines) and raises :class:`ACMEProtocolError`
naming the resource and the field.  Only the fields csrproxy uses are kept.

A status outside RFC 8555 §7.1.6 is a protocol error, not a fallback: a CA that says
something we cannot interpret must not be guessed at.  A known status where the RFC
does not list it for that resource (an order "deactivated") parses, and the order code
treats it as not what it waited for.

Problem documents of error answers are the exception to strictness:
:func:`problem_from_json` turns whatever the CA sent into an :class:`ACMEProblem`, so
the CA's own words reach the caller.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

from csrproxy.acme.problems import ACMEProblem, ACMEProtocolError, short_problem_type

#: RFC 8555 §8.1: a token is base64url; anything else cannot go into a key authorization.
_TOKEN = re.compile(r"[A-Za-z0-9_-]+\Z")


class Status(enum.Enum):
    """The status of an account, order, authorization or challenge (RFC 8555 §7.1.6)."""

    PENDING = "pending"
    READY = "ready"
    PROCESSING = "processing"
    VALID = "valid"
    INVALID = "invalid"
    DEACTIVATED = "deactivated"
    EXPIRED = "expired"
    REVOKED = "revoked"

    @classmethod
    def from_json(cls, value: object, where: str) -> Status:
        if isinstance(value, str):
            try:
                return cls(value)
            except ValueError:
                pass
        raise ACMEProtocolError(f"{where}: unknown status {_shown(value)}")


@dataclass(frozen=True)
class Identifier:
    """What a certificate names: ``type`` is ``dns`` for every identifier csrproxy orders."""

    type: str
    value: str

    @classmethod
    def from_json(cls, doc: object, where: str) -> Identifier:
        d = _object(doc, where)
        return cls(_str(d, "type", where), _str(d, "value", where))


@dataclass(frozen=True)
class Subproblem:
    """One identifier's part of a compound problem (RFC 8555 §6.7.1)."""

    type: str
    detail: str
    identifier: Identifier | None = None

    @property
    def short_type(self) -> str:
        return short_problem_type(self.type)


@dataclass(frozen=True)
class Directory:
    """The CA's directory (§7.1.1): the URLs of its resources and what it offers."""

    url: str
    new_nonce: str
    new_account: str
    new_order: str
    revoke_cert: str | None = None
    key_change: str | None = None
    #: The ARI base URL (RFC 9773), when the CA offers renewal information.
    renewal_info: str | None = None
    terms_of_service: str | None = None
    #: Names of the profiles the CA offers (``meta.profiles``).
    profiles: frozenset[str] = frozenset()
    external_account_required: bool = False

    @classmethod
    def from_json(cls, doc: object, url: str) -> Directory:
        where = f"directory {url}"
        d = _object(doc, where)
        meta = _optional_object(d, "meta", where)
        profiles = _optional_object(meta, "profiles", f"{where} meta")
        required = meta.get("externalAccountRequired", False)
        if not isinstance(required, bool):
            raise ACMEProtocolError(f"{where}: meta.externalAccountRequired is not a boolean")
        return cls(
            url=url,
            new_nonce=_url(d, "newNonce", where),
            new_account=_url(d, "newAccount", where),
            new_order=_url(d, "newOrder", where),
            revoke_cert=_optional_url(d, "revokeCert", where),
            key_change=_optional_url(d, "keyChange", where),
            renewal_info=_optional_url(d, "renewalInfo", where),
            terms_of_service=_optional_str(meta, "termsOfService", f"{where} meta"),
            profiles=frozenset(profiles),
            external_account_required=required,
        )


@dataclass(frozen=True)
class Account:
    """An account resource (§7.1.2), as newAccount or the account URL returns it."""

    url: str
    status: Status
    contact: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, doc: object, url: str) -> Account:
        where = f"account {url}"
        d = _object(doc, where)
        return cls(
            url=url,
            status=Status.from_json(d.get("status"), where),
            contact=_strings(d, "contact", where),
        )


@dataclass(frozen=True)
class Challenge:
    """One challenge of an authorization (§7.1.5, §8); ``token`` is checked for dns-01."""

    type: str
    url: str
    status: Status
    token: str | None = None
    error: ACMEProblem | None = None

    @classmethod
    def from_json(cls, doc: object, where: str) -> Challenge:
        d = _object(doc, where)
        type = _str(d, "type", where)
        where = f"{where} ({type})"
        token = _optional_str(d, "token", where)
        if type == "dns-01" and (token is None or not _TOKEN.match(token)):
            raise ACMEProtocolError(f"{where}: token {_shown(token)} is not base64url")
        return cls(
            type=type,
            url=_url(d, "url", where),
            status=Status.from_json(d.get("status"), where),
            token=token,
            error=_error(d, where),
        )


@dataclass(frozen=True)
class Authorization:
    """An authorization resource (§7.1.4) and the URL it was read from."""

    url: str
    identifier: Identifier
    status: Status
    challenges: tuple[Challenge, ...]
    wildcard: bool = False

    @classmethod
    def from_json(cls, doc: object, url: str) -> Authorization:
        where = f"authorization {url}"
        d = _object(doc, where)
        challenges = _list(d, "challenges", where)
        wildcard = d.get("wildcard", False)
        if not isinstance(wildcard, bool):
            raise ACMEProtocolError(f"{where}: 'wildcard' is not a boolean")
        return cls(
            url=url,
            identifier=Identifier.from_json(d.get("identifier"), f"{where} identifier"),
            status=Status.from_json(d.get("status"), where),
            challenges=tuple(
                Challenge.from_json(c, f"{where} challenge {i}") for i, c in enumerate(challenges)
            ),
            wildcard=wildcard,
        )

    def challenge(self, type: str) -> Challenge | None:
        """The first challenge of ``type`` (``dns-01``), if the CA offers one."""
        return next((c for c in self.challenges if c.type == type), None)

    @property
    def problem(self) -> ACMEProblem | None:
        """Why the authorization failed: the first challenge error the CA gave."""
        return next((c.error for c in self.challenges if c.error is not None), None)


@dataclass(frozen=True)
class Order:
    """An order resource (§7.1.3) and its URL (newOrder's ``Location``)."""

    url: str
    status: Status
    authorizations: tuple[str, ...]
    finalize: str
    identifiers: tuple[Identifier, ...] = ()
    certificate: str | None = None
    error: ACMEProblem | None = None

    @classmethod
    def from_json(cls, doc: object, url: str) -> Order:
        where = f"order {url}"
        d = _object(doc, where)
        authorizations = _list(d, "authorizations", where)
        identifiers = [] if d.get("identifiers") is None else _list(d, "identifiers", where)
        return cls(
            url=url,
            status=Status.from_json(d.get("status"), where),
            authorizations=tuple(
                checked_url(u, f"{where}: authorization {i}") for i, u in enumerate(authorizations)
            ),
            finalize=_url(d, "finalize", where),
            identifiers=tuple(
                Identifier.from_json(i, f"{where} identifier {n}")
                for n, i in enumerate(identifiers)
            ),
            certificate=_optional_url(d, "certificate", where),
            error=_error(d, where),
        )


@dataclass(frozen=True)
class CertificateChain:
    """A downloaded chain (§7.4.2): PEM, leaf first, and the alternate chains' URLs."""

    url: str
    pem: str
    alternates: tuple[str, ...] = ()

    @classmethod
    def from_pem(cls, body: bytes, url: str, links: Sequence[str] = ()) -> CertificateChain:
        """``links`` are the ``Link: rel="alternate"`` targets, relative ones resolved."""
        pem = body.decode("ascii", "replace")
        if "-----BEGIN CERTIFICATE-----" not in pem:
            raise ACMEProtocolError(f"{url} did not return a PEM chain")
        alternates = tuple(urljoin(url, link) for link in links)
        for alt in alternates:
            checked_url(alt, f"certificate {url}: alternate")
        return cls(url, pem, alternates)


def problem_from_json(
    doc: object,
    status: int,
    *,
    retry_after: float | None = None,
    nonce: str | None = None,
    url: str | None = None,
) -> ACMEProblem:
    """The problem an error answer carries; whatever the CA sent becomes a problem."""
    d: Mapping[str, Any] = doc if isinstance(doc, Mapping) else {}
    subs = d.get("subproblems")
    return ACMEProblem(
        type=str(d.get("type") or "about:blank"),
        detail=str(d.get("detail") or f"HTTP {status}"),
        status=status,
        subproblems=[_subproblem(s) for s in subs if isinstance(s, Mapping)]
        if isinstance(subs, list)
        else (),
        retry_after=retry_after,
        nonce=nonce,
        url=url,
    )


def _subproblem(doc: Mapping[str, Any]) -> Subproblem:
    ident = doc.get("identifier")
    identifier = None
    if isinstance(ident, Mapping):
        kind, value = ident.get("type"), ident.get("value")
        if isinstance(kind, str) and isinstance(value, str):
            identifier = Identifier(kind, value)
    return Subproblem(
        str(doc.get("type") or "about:blank"), str(doc.get("detail") or ""), identifier
    )


def _error(doc: Mapping[str, Any], where: str) -> ACMEProblem | None:
    """The ``error`` field of an order or challenge: a problem document, or None."""
    value = doc.get("error")
    if value is None:
        return None
    error = _object(value, f"{where} error")
    # Embedded problems seldom carry a status; a refused validation is a client error.
    status = error.get("status", 403)
    if not isinstance(status, int) or isinstance(status, bool):
        raise ACMEProtocolError(f"{where} error: status {_shown(status)} is not a number")
    return problem_from_json(error, status)


def _object(doc: object, where: str) -> Mapping[str, Any]:
    if not isinstance(doc, Mapping):
        raise ACMEProtocolError(f"{where} is {_shown(doc)}, not a JSON object")
    return doc


def _optional_object(doc: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = doc.get(key)
    return {} if value is None else _object(value, f"{where} {key}")


def _str(doc: Mapping[str, Any], key: str, where: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str):
        raise ACMEProtocolError(f"{where}: {key!r} is {_shown(value)}, not a string")
    return value


def _optional_str(doc: Mapping[str, Any], key: str, where: str) -> str | None:
    return None if doc.get(key) is None else _str(doc, key, where)


def _strings(doc: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = doc.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ACMEProtocolError(f"{where}: {key!r} is {_shown(value)}, not a list of strings")
    return tuple(value)


def _list(doc: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = doc.get(key)
    if not isinstance(value, list):
        raise ACMEProtocolError(f"{where}: {key!r} is {_shown(value)}, not a list")
    return value


def _url(doc: Mapping[str, Any], key: str, where: str) -> str:
    return checked_url(doc.get(key), f"{where}: {key!r}")


def _optional_url(doc: Mapping[str, Any], key: str, where: str) -> str | None:
    return None if doc.get(key) is None else _url(doc, key, where)


def checked_url(value: object, where: str) -> str:
    """``value`` if it is an absolute http(s) URL, else ACMEProtocolError naming ``where``."""
    if isinstance(value, str):
        try:
            parts = urlsplit(value)
        except ValueError:
            pass
        else:
            if parts.scheme in ("https", "http") and parts.hostname:
                return value
    raise ACMEProtocolError(f"{where} is {_shown(value)}, not an http(s) URL")


def _shown(value: object) -> str:
    """A CA-supplied value in an error message, cut short."""
    text = "missing" if value is None else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
