"""Who may ask: bearer tokens (stored as hashes), client CIDRs, and the client address
behind trusted reverse proxies.  Pure logic; the tokens file is read at start-up and
again on SIGHUP (:func:`reload_tokens`).

Tokens file (``[api] tokens_file``), one token per line, ``#`` starts a comment::

    sha256:<64 hex digits>                          # any name policy allows
    sha256:<64 hex digits> {key}.go.example.com     # only names matching these patterns

Make a token and its line with ``python -m csrproxy.web.auth new`` (or hash an existing
token read from stdin with ``python -m csrproxy.web.auth hash``).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from csrproxy.config import Network
from csrproxy.errors import BadRequest, ClientNotAllowed, ConfigError, Unauthorized
from csrproxy.issuance.policy import NamePolicy


def token_hash(token: str) -> str:
    """The line prefix that identifies ``token`` in a tokens file."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Token:
    """One accepted token: its SHA-256 digest and the names it may ask for (None: any)."""

    digest: bytes
    policy: NamePolicy | None

    @property
    def client_id(self) -> str:
        """A stable, non-secret id for per-client limits and logs."""
        return "token:" + self.digest.hex()[:12]


def parse_tokens(text: str, source: str = "tokens_file") -> list[Token]:
    """Parse a tokens file; raise :class:`ConfigError` naming the line of a bad entry."""
    tokens = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        head, _, rest = line.partition(" ")
        algo, _, hexdigest = head.partition(":")
        if algo != "sha256" or len(hexdigest) != 64:
            raise ConfigError("api.tokens_file", f"{source}:{number}: expected sha256:<64 hex>")
        try:
            digest = bytes.fromhex(hexdigest)
        except ValueError:
            raise ConfigError("api.tokens_file", f"{source}:{number}: not hex") from None
        patterns = [p for p in rest.replace(",", " ").split() if p]
        try:
            policy = NamePolicy(patterns) if patterns else None
        except ValueError as e:
            raise ConfigError("api.tokens_file", f"{source}:{number}: {e}") from None
        tokens.append(Token(digest, policy))
    return tokens


def load_tokens(path: str) -> list[Token]:
    try:
        text = Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("api.tokens_file", f"cannot read {path}: {e}") from e
    tokens = parse_tokens(text, path)
    if not tokens:
        raise ConfigError("api.tokens_file", f"{path} holds no token")
    return tokens


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A bare IPv4 or IPv6 address (``[v6]`` too), else None: no port, no name."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _within(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: Sequence[Network]) -> bool:
    return any(addr.version == n.version and addr in n for n in nets)


class ClientGate:
    """Decides who the client is and whether it may ask at all."""

    def __init__(
        self,
        tokens: Sequence[Token] = (),
        allow_from: Sequence[Network] = (),
        trusted_proxies: Sequence[Network] = (),
    ) -> None:
        self.tokens = tuple(tokens)
        self.allow_from = tuple(allow_from)
        self.trusted_proxies = tuple(trusted_proxies)

    def client_address(self, peer: str, forwarded_for: Sequence[str] | None = None) -> str:
        """The client's address: the peer's, or from ``X-Forwarded-For`` (all its header
        lines, in order; None or empty when the request has none) when the peer is a
        trusted proxy.

        The hops are walked from the nearest back; the first one outside
        ``trusted_proxies`` is the client (an all-trusted chain: the farthest hop).  A hop
        the walk reaches that is not a bare address (``10.1.2.3:4444``, ``unknown``, an
        empty entry, garbage) fails closed: :class:`BadRequest`, never the proxy's own
        address, which would let the client escape ``allow_from`` and share the proxy's
        rate bucket.  Hops beyond the client are the client's to write and never read.
        """
        addr = _address(peer)
        if addr is None or not _within(addr, self.trusted_proxies):
            return str(addr) if addr is not None else peer
        if not forwarded_for:
            return str(addr)  # the proxy's own request
        hops = ",".join(forwarded_for).split(",")
        for hop in reversed(hops):
            hop_addr = _address(hop)
            if hop_addr is None:
                raise BadRequest(
                    f"X-Forwarded-For from trusted proxy {addr} names no client address: "
                    f"{hop.strip()[:64]!r} is not an IP address"
                )
            addr = hop_addr
            if not _within(hop_addr, self.trusted_proxies):
                break
        return str(addr)

    def check_address(self, address: str) -> None:
        if not self.allow_from:
            return
        addr = _address(address)
        if addr is None or not _within(addr, self.allow_from):
            raise ClientNotAllowed(f"{address} is not allowed to use this service", address)

    def check_token(self, authorization: str | None) -> Token | None:
        """The token sent as ``Authorization: Bearer``; None when no tokens are configured."""
        if not self.tokens:
            return None
        if not authorization:
            raise Unauthorized("a bearer token is required (Authorization: Bearer <token>)")
        scheme, _, presented = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Unauthorized("use Authorization: Bearer <token>")
        digest = hashlib.sha256(presented.strip().encode("utf-8")).digest()
        found = None
        # Compare with every token, in constant time each, and never stop early.
        for token in self.tokens:
            if hmac.compare_digest(digest, token.digest):
                found = token
        if found is None:
            raise Unauthorized("the bearer token is not valid")
        return found

    def replace_tokens(self, tokens: Sequence[Token]) -> None:
        """Accept ``tokens`` instead of the current ones, all at once (one rebinding, on the
        reactor thread: a request sees the old set or the new one, never a mix).

        Raises ``ValueError`` for no tokens while tokens are in use: that would turn
        authentication off.
        """
        if self.tokens and not tokens:
            raise ValueError("no tokens: refusing to turn authentication off")
        self.tokens = tuple(tokens)


def reload_tokens(gate: ClientGate, path: str) -> int:
    """Read the tokens file ``path`` again into ``gate`` (SIGHUP); the number of tokens.

    Raises :class:`ConfigError` naming the problem, and ``gate`` keeps its tokens, when
    the file cannot be read, has a bad line or holds no token.
    """
    tokens = load_tokens(path)
    gate.replace_tokens(tokens)
    return len(tokens)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m csrproxy.web.auth new [pattern ...]`` or ``python -m csrproxy.web.auth hash``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["new"]:
        token = secrets.token_urlsafe(32)
        print(f"token (give it to the client): {token}", file=sys.stderr)
        print(" ".join([token_hash(token), *args[1:]]))
        return 0
    if args[:1] == ["hash"]:
        token = sys.stdin.readline().strip()
        if not token:
            print("csrproxy.web.auth hash: give the token on stdin", file=sys.stderr)
            return 2
        print(" ".join([token_hash(token), *args[1:]]))
        return 0
    print("usage: python -m csrproxy.web.auth new|hash [pattern ...]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
