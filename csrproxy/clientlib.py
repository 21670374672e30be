"""The installation's side as a library: key, CSR, signing, chain checks, atomic files.

Imports nothing from csrproxy's server modules (stdlib and cryptography only).  Time
(``now``/``sleep``) and HTTP (``transport``) are injectable, so it is tested without
sockets or waiting.  :mod:`csrproxy.client` builds the command line and renewal on it.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import json
import logging
import os
import re
import ssl
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

log = logging.getLogger("csrproxy.client")

KEY_FILE, CERT_FILE, CHAIN_FILE, STATE_FILE = "key.pem", "cert.pem", "chain.pem", "csrproxy.json"
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_NETWORK, EXIT_RELOAD = 0, 1, 2, 3, 4
KEY_TYPES = ("ec256", "ec384", "rsa2048", "rsa3072", "rsa4096")
CERT_ID_HEADER = "CSRProxy-Certificate-Id"
CERT_LINK_REL = "csrproxy-certificate"
DEFAULT_TIMEOUT = 600.0

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
Progress = Callable[[str], None]
"""Called with what the client waits for ("" once it stops waiting)."""


class ClientError(Exception):
    """A failure with the exit code it maps to."""

    def __init__(self, message: str, exit_code: int, status: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.status = status


# -- HTTP --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes | None = None
    timeout: float = 60.0


@dataclass(frozen=True)
class Response:
    status: int
    headers: Mapping[str, str]  # names lowercased
    body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


Transport = Callable[[Request], Response]
"""One HTTP exchange.  Any status is a :class:`Response`; a failure to talk to the server
raises :class:`ClientError` with ``EXIT_NETWORK``."""


class UrllibTransport:
    def __init__(self, cafile: str | None = None) -> None:
        self.cafile = cafile

    def __call__(self, req: Request) -> Response:
        r = urllib.request.Request(req.url, req.body, dict(req.headers), method=req.method)
        ctx = (
            ssl.create_default_context(cafile=self.cafile) if req.url.startswith("https") else None
        )
        try:
            with urllib.request.urlopen(r, timeout=req.timeout, context=ctx) as resp:
                return Response(resp.status, _lower(resp.headers.items()), resp.read())
        except urllib.error.HTTPError as e:
            return Response(e.code, _lower(e.headers.items()), e.read())
        except (OSError, http.client.HTTPException) as e:
            raise ClientError(f"cannot reach {req.url}: {e}", EXIT_NETWORK) from e


def _lower(items: Any) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in items}


def retry_after(resp: Response, now: float) -> float | None:
    """Seconds from ``Retry-After`` (delta-seconds or an HTTP date), if any."""
    value = resp.header("retry-after")
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError):
        return None


def problem_text(resp: Response) -> str:
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
    pem: bytes
    certificate_id: str | None = None
    certificate_url: str | None = None
    retry_after: float | None = None


@dataclass
class Server:
    """A csrproxy server as the client sees it."""

    url: str
    token: str | None = None
    transport: Transport = field(default_factory=UrllibTransport)
    now: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    progress: Progress | None = None

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/").removesuffix("/v1/sign").rstrip("/")

    def call(
        self, method: str, url: str, body: bytes | None = None, timeout: float = 60
    ) -> Response:
        headers = {"Accept": "application/pem-certificate-chain, application/json"}
        if body is not None:
            headers["Content-Type"] = "application/pkcs10"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        full = urllib.parse.urljoin(self.url + "/", url)
        return self.transport(Request(method, full, headers, body, timeout))

    def refused(self, what: str, resp: Response) -> ClientError:
        return ClientError(f"{what}: {resp.status} {problem_text(resp)}", EXIT_REFUSED, resp.status)

    def names(self, public_key_pem: bytes) -> list[str]:
        """The concrete names the policy gives this key (``GET /v1/name``); ``{label}``
        patterns are left out, since only the client can choose a label."""
        resp = self.call("GET", "/v1/name", public_key_pem)
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
        when the server answers 202; 429s are retried after ``Retry-After`` when that fits
        in ``timeout`` (the whole wait's deadline)."""
        deadline = self.now() + timeout
        self._progress("waiting for the CA")
        try:
            while True:
                resp = self.call("POST", "/v1/sign", csr_pem, timeout=self._left(deadline))
                if resp.status == 202:
                    return self._poll(resp, deadline)
                if resp.status == 429 and self._pause(resp, deadline, "rate-limited"):
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
            except ClientError as e:  # the order goes on without us: try again
                log.warning("%s; trying again", e)
                resp = Response(202, {"retry-after": "5"})

    def _pause(self, resp: Response, deadline: float, why: str, floor: float = 0.0) -> bool:
        """Sleep as ``Retry-After`` asks (1 s if absent), if that fits before the deadline;
        else raise (the deadline is EXIT_NETWORK, a 429 is EXIT_REFUSED)."""
        delay = max(floor, retry_after(resp, self.now()) or 1.0)
        if self.now() + delay > deadline:
            if resp.status == 429:
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


# -- keys, CSRs, chains ------------------------------------------------------------------


def generate_key(key_type: str = "ec256") -> PrivateKey:
    if key_type == "ec256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type in ("rsa2048", "rsa3072", "rsa4096"):
        return rsa.generate_private_key(65537, int(key_type[3:]))
    raise ClientError(f"unknown key type {key_type!r} (one of {', '.join(KEY_TYPES)})", EXIT_USAGE)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_key(path: Path) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise ClientError(f"cannot read the key {path}: {e}", EXIT_USAGE) from e
    if not isinstance(key, PrivateKey):
        raise ClientError(f"{path} holds an unsupported key type", EXIT_USAGE)
    return key


def public_key_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def same_key(cert: x509.Certificate, key: PrivateKey) -> bool:
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)


def key_label(key: PrivateKey) -> str:
    """The server's ``{key}`` label: base32 of 160 bits of SHA-256 over the SPKI."""
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashes.Hash(hashes.SHA256())
    digest.update(der)
    return base64.b32encode(digest.finalize()[:20]).decode().lower()


def make_csr(key: PrivateKey, names: Sequence[str]) -> bytes:
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def dns_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.DNSName)


def verify_chain(
    pem: bytes,
    key: PrivateKey,
    names: Sequence[str],
    root_pem: bytes | None = None,
    now: float | None = None,
) -> list[x509.Certificate]:
    """The leaf carries our key and exactly our names, each cert is signed by the next
    (and the last by ``root_pem`` when given), and the leaf is valid at ``now``."""
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise ClientError(f"the server's answer is not a PEM chain: {e}", EXIT_REFUSED) from e
    leaf = chain[0]
    if not same_key(leaf, key):
        raise ClientError("the certificate's key is not our key", EXIT_REFUSED)
    got = sorted({n.lower() for n in dns_names(leaf)})
    if got != sorted({n.lower() for n in names}):
        raise ClientError(f"the certificate names {got}, not {sorted(names)}", EXIT_REFUSED)
    t = time.time() if now is None else now
    if not leaf.not_valid_before_utc.timestamp() - 300 <= t < leaf.not_valid_after_utc.timestamp():
        raise ClientError("the certificate is not valid now", EXIT_REFUSED)
    issuers = chain[1:] + ([x509.load_pem_x509_certificate(root_pem)] if root_pem else [])
    for child, parent in zip(chain, issuers, strict=False):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise ClientError(
                f"{child.subject.rfc4514_string()} is not issued by "
                f"{parent.subject.rfc4514_string()}: {e}",
                EXIT_REFUSED,
            ) from e
    return chain


def pem_of(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def load_chain(path: Path) -> list[x509.Certificate] | None:
    try:
        return x509.load_pem_x509_certificates(path.read_bytes())
    except (OSError, ValueError):
        return None


# -- files -------------------------------------------------------------------------------


def _temp_copy(path: Path, data: bytes, mode: int) -> Path:
    """``data`` in a fsynced temp file next to ``path``, with the mode and group of the
    file it will replace (when there is one), else ``mode``."""
    try:
        st: os.stat_result | None = path.stat()
    except FileNotFoundError:
        st = None
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, (st.st_mode & 0o777) if st else mode)
        if st is not None:
            with suppress(OSError):
                os.fchown(fd, -1, st.st_gid)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    return Path(name)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_files(directory: Path, files: Sequence[tuple[str, bytes, int]]) -> None:
    """Replace several files, in the order given, so that each is the old or the new one.

    Every new file is written and fsynced to a temp file first; then the renames follow
    each other.  If anything fails, the files already renamed get their old content back
    and no temp file is left.  A power cut between two renames can still leave the
    earlier files new and the later ones old (each file whole).
    """
    temps: list[tuple[Path, Path]] = []
    done: list[tuple[Path, bytes | None]] = []
    try:
        for name, data, mode in files:
            temps.append((_temp_copy(directory / name, data, mode), directory / name))
        for tmp, target in temps:
            old = target.read_bytes() if target.exists() else None
            os.replace(tmp, target)
            done.append((target, old))
        _fsync_dir(directory)
    except BaseException:
        for target, old in reversed(done):
            try:
                if old is None:
                    target.unlink(missing_ok=True)
                else:
                    os.replace(_temp_copy(target, old, 0o600), target)
            except OSError:
                log.exception("could not put %s back", target)
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: a crash leaves the old or the new file, never a part."""
    write_files(path.parent, [(path.name, data, mode)])


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """One client at a time in ``directory`` (``.csrproxy.lock``, flock)."""
    import fcntl

    if not directory.is_dir():
        raise ClientError(
            f"no directory {directory}: run `csrproxy-client issue` first", EXIT_USAGE
        )
    fd = os.open(directory / ".csrproxy.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load_state(directory: Path) -> dict[str, Any]:
    path = directory / STATE_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ClientError(f"no {path}: run `csrproxy-client issue` first", EXIT_USAGE) from e
    except (OSError, ValueError) as e:
        raise ClientError(f"cannot read {path}: {e}", EXIT_USAGE) from e
    if not isinstance(doc, dict) or not doc.get("url") or not doc.get("names"):
        raise ClientError(f"{path} lacks url or names", EXIT_USAGE)
    return doc


def state_bytes(state: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(state), indent=2, sort_keys=True).encode() + b"\n"
