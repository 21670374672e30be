"""csrproxy's client-facing API as the installation calls it: :class:`Server` signs a CSR
(synchronously, else by polling the order after a 202; 429s retried after
``Retry-After``), asks which names the policy gives a key, and fetches a certificate's
newest chain.  It talks to the origin of its URL only, follows no redirect and sends the
token over plain http only when told to.  Time (``now``/``sleep``) and HTTP
(``transport``) are injected."""

from __future__ import annotations

import json
import logging
import re
import stat
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from csrproxy.client.errors import EXIT_NETWORK, EXIT_REFUSED, EXIT_USAGE, ClientError
from csrproxy.client.transport import Request, Response, Transport, UrllibTransport, retry_after

# One logger for the whole client, as before the split: the CLI's handler attaches to it.
log = logging.getLogger("csrproxy.client")

CERT_ID_HEADER = "CSRProxy-Certificate-Id"
CERT_LINK_REL = "csrproxy-certificate"
DEFAULT_TIMEOUT = 600.0

Clock = Callable[[], float]
Progress = Callable[[str], None]
"""Called with what the client waits for ("" once it stops waiting)."""


def read_token(token_file: str | Path | None) -> str | None:
    """The bearer token in ``token_file`` (stripped), or None without a file; a file that
    everyone can read is logged as a warning."""
    if token_file is None:
        return None
    path = Path(token_file)
    try:
        token = path.read_text().strip()
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as e:
        raise ClientError(f"cannot read the token file: {e}", EXIT_USAGE) from e
    if not token:
        raise ClientError(f"the token file {token_file} is empty", EXIT_USAGE)
    if mode & stat.S_IROTH:
        log.warning("the token file %s is readable by everyone (mode %04o)", path, mode)
    return token


Origin = tuple[str, str, int]


def origin_of(url: str) -> Origin:
    """(scheme, host, port) of an http(s) URL; ValueError for anything else."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL")
    return scheme, parts.hostname.lower(), parts.port or (443 if scheme == "https" else 80)


def problem_text(resp: Response) -> str:
    """A problem document's detail and type, or the start of a body that is not one."""
    try:
        doc = json.loads(resp.body)
        return (
            f"{doc.get('detail') or doc.get('title')} ({doc.get('type', '?').rsplit('/', 1)[-1]})"
        )
    except (ValueError, AttributeError):
        return resp.body[:200].decode("utf-8", "replace").strip() or "(no detail)"


def certificate_ref(resp: Response, base: str) -> tuple[str | None, str | None]:
    """The certificate id and its URL from ``CSRProxy-Certificate-Id`` and/or the
    ``Link: <...>; rel="csrproxy-certificate"`` of a chain response."""
    cid = (resp.header(CERT_ID_HEADER) or "").strip() or None
    url = None
    for m in re.finditer(r"<([^>]*)>([^,]*)", resp.header("link") or ""):
        rels = re.search(r'rel\s*=\s*"?([^";]+)"?', m.group(2))
        if rels and CERT_LINK_REL in rels.group(1).split():
            url = urllib.parse.urljoin(base + "/", m.group(1))
    if cid is None and url is not None:
        cid = urllib.parse.unquote(url.rstrip("/").rsplit("/", 1)[-1])
    if cid is not None and url is None:
        url = f"{base}/v1/certificates/{urllib.parse.quote(cid, safe='')}"
    return cid, url


@dataclass
class Signed:
    """A chain the server answered, with the certificate it belongs to (when named)."""

    pem: bytes
    certificate_id: str | None = None
    certificate_url: str | None = None
    retry_after: float | None = None


@dataclass
class Server:
    """A csrproxy server as the client sees it.

    Every request goes to the origin (scheme, host, port) of ``url``: a URL the server
    names elsewhere (a 202's ``Location``, an order's certificate) is refused, and so is
    any 3xx answer, so the token never reaches another origin.  With a token, ``url``
    must be https:// unless ``insecure``."""

    url: str
    token: str | None = field(default=None, repr=False)
    transport: Transport = field(default_factory=UrllibTransport)
    now: Clock = time.time
    sleep: Callable[[float], None] = time.sleep
    progress: Progress | None = None
    insecure: bool = False
    origin: Origin = field(init=False)

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/").removesuffix("/v1/sign").rstrip("/")
        try:
            self.origin = origin_of(self.url)
        except ValueError as e:
            raise ClientError(str(e), EXIT_USAGE) from e
        if self.token and self.origin[0] != "https" and not self.insecure:
            raise ClientError(
                f"refusing to send the bearer token in the clear to {self.url}: use an "
                f"https:// URL, or --insecure (insecure=True) on a network you trust",
                EXIT_USAGE,
            )

    def call(
        self, method: str, url: str, body: bytes | None = None, timeout: float = 60
    ) -> Response:
        """One request to ``url`` (relative to the server's URL, or absolute in its
        origin); a 3xx answer is a :class:`ClientError` (exit 1) naming its Location."""
        full = urllib.parse.urljoin(self.url + "/", url)
        try:
            same = origin_of(full) == self.origin
        except ValueError:
            same = False
        if not same:
            raise ClientError(
                f"the server pointed the client at {full}, outside {self.url}: refused "
                f"(csrproxy-client talks to the origin of --url only)",
                EXIT_REFUSED,
            )
        headers = {"Accept": "application/pem-certificate-chain, application/json"}
        if body is not None:
            headers["Content-Type"] = "application/pkcs10"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        resp = self.transport(Request(method, full, headers, body, timeout))
        if 300 <= resp.status < 400:
            raise ClientError(
                f"{method} {full} answered {resp.status}, a redirect to "
                f"{resp.header('location') or '(no Location)'}: csrproxy-client follows no "
                f"redirect, so that its token goes nowhere else; if it is csrproxy, give "
                f"that URL to issue --url",
                EXIT_REFUSED,
                resp.status,
            )
        return resp

    def refused(self, what: str, resp: Response) -> ClientError:
        return ClientError(f"{what}: {resp.status} {problem_text(resp)}", EXIT_REFUSED, resp.status)

    def names(self, public_key_pem: bytes, current: Sequence[str] = ()) -> list[str]:
        """The concrete names the policy gives this key (``GET /v1/name``); ``{label}``
        patterns are left out, since only the client can choose a label. ``current``, the
        names the installation has, are sent along: the server keeps them while the policy
        allows them, so a renewal keeps its zone (``[dns] zones``) and costs no budget."""
        query = urllib.parse.urlencode([("current", n) for n in current])
        resp = self.call("GET", "/v1/name" + ("?" + query if query else ""), public_key_pem)
        if resp.status != 200:
            raise self.refused("GET /v1/name", resp)
        try:
            names = json.loads(resp.body).get("names")
        except (ValueError, AttributeError) as e:
            raise ClientError(f"/v1/name did not answer a JSON object: {e}", EXIT_REFUSED) from e
        if not isinstance(names, list):
            raise ClientError("/v1/name gave no name list", EXIT_REFUSED)
        return [n for n in names if isinstance(n, str) and "{" not in n]

    def sign(self, csr_pem: bytes, timeout: float = DEFAULT_TIMEOUT) -> Signed:
        """POST the CSR and wait for its chain: synchronously, then by polling the order
        when the server answers 202; 429s, and 503s with ``Retry-After`` (the CA is known to
        be failing), are retried after ``Retry-After`` when that fits in ``timeout`` (the
        whole wait's deadline)."""
        deadline = self.now() + timeout
        self._progress("waiting for the CA")
        try:
            while True:
                resp = self.call("POST", "/v1/sign", csr_pem, timeout=self._left(deadline))
                if resp.status == 202:
                    return self._poll(resp, deadline)
                if resp.status == 429 and self._pause(resp, deadline, "rate-limited"):
                    continue
                # The server knows the CA is failing (its circuit breaker): wait as it says.
                if (
                    resp.status == 503
                    and resp.header("retry-after")
                    and self._pause(resp, deadline, "the CA is unavailable")
                ):
                    continue
                return self._chain(resp, "POST /v1/sign")
        finally:
            self._progress("")

    def certificate(self, url: str) -> Signed:
        """The newest chain for a certificate id (``GET /v1/certificates/<id>``)."""
        return self._chain(self.call("GET", url), f"GET {url}")

    def _chain(self, resp: Response, what: str) -> Signed:
        if resp.status != 200:
            raise self.refused(what, resp)
        cid, curl = certificate_ref(resp, self.url)
        return Signed(resp.body, cid, curl, retry_after(resp, self.now()))

    def _poll(self, accepted: Response, deadline: float) -> Signed:
        location = accepted.header("location")
        if not location:
            raise ClientError("the server answered 202 without a Location", EXIT_REFUSED, 202)
        log.info("the order is taking a while; polling %s", location)
        self._progress("waiting for the CA (order accepted)")
        resp = accepted
        while True:
            doc = _json_object(resp.body)
            if resp.status == 200 and doc.get("status") == "valid":
                cert_url = str(doc.get("certificate") or location.rstrip("/") + "/certificate")
                return self._chain(self.call("GET", cert_url), f"GET {cert_url}")
            if resp.status == 200 and doc.get("status") == "invalid":
                err = doc["error"] if isinstance(doc.get("error"), dict) else {}
                raise ClientError(
                    f"the order failed: {err.get('detail', '?')} ({err.get('type', '?')})",
                    EXIT_REFUSED,
                    int(err.get("status") or 0) or None,
                )
            if resp.status not in (200, 202, 429):
                raise self.refused(f"GET {location}", resp)
            self._pause(resp, deadline, "still processing", floor=0.2)
            wait = min(30.0, self._left(deadline))
            try:
                resp = self.call("GET", location, timeout=wait)
            except ClientError as e:  # the network failed; the order goes on: try again
                if e.exit_code != EXIT_NETWORK:
                    raise
                log.warning("%s; trying again", e)
                resp = Response(202, {"retry-after": "5"})

    def _pause(self, resp: Response, deadline: float, why: str, floor: float = 0.0) -> bool:
        """Sleep as ``Retry-After`` asks (1 s if absent), if that fits before the deadline;
        else raise (the deadline is EXIT_NETWORK, a 429 is EXIT_REFUSED)."""
        delay = max(floor, retry_after(resp, self.now()) or 1.0)
        if self.now() + delay > deadline:
            if resp.status in (429, 503):
                raise self.refused(f"{why}, retry after {delay:.0f}s", resp)
            raise ClientError("no certificate before the deadline (--timeout)", EXIT_NETWORK)
        log.debug("%s; waiting %.1fs", why, delay)
        self.sleep(delay)
        return True

    def _left(self, deadline: float) -> float:
        left = deadline - self.now()
        if left <= 0:
            raise ClientError("no certificate before the deadline (--timeout)", EXIT_NETWORK)
        return max(1.0, min(left, 300.0))

    def _progress(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}
