"""The installation's certificate directory: key.pem (0600), cert.pem (leaf + chain),
chain.pem, csrproxy.json (what ``renew`` needs), and the lock that lets one client in."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography import x509

from csrproxy.client.api import Signed
from csrproxy.client.chains import pem_of
from csrproxy.client.errors import EXIT_USAGE, ClientError
from csrproxy.client.files import write_files
from csrproxy.client.keys import PrivateKey, key_pem

KEY_FILE, CERT_FILE, CHAIN_FILE, STATE_FILE = "key.pem", "cert.pem", "chain.pem", "csrproxy.json"


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """One client at a time in ``directory`` (``.csrproxy.lock``, flock)."""
    import fcntl  # here, so the package still imports where there is no fcntl

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
    """csrproxy.json of ``directory``; missing, unreadable or incomplete is a usage error."""
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


def record_signed(state: dict[str, Any], names: Sequence[str], signed: Signed) -> None:
    """Note in ``state`` the names asked for and the certificate the server named."""
    state["names"] = list(names)
    if signed.certificate_id:
        state["certificate_id"] = signed.certificate_id
        state["certificate_url"] = signed.certificate_url


def install(
    path: Path, chain: list[x509.Certificate], new_key: PrivateKey | None, state: dict[str, Any]
) -> None:
    """chain.pem, then key.pem (only when rotating), cert.pem, csrproxy.json: see
    :func:`csrproxy.client.files.write_files` for what a failure or a crash leaves."""
    files = [(CHAIN_FILE, pem_of(chain[1:]), 0o644)]
    if new_key is not None:
        files.append((KEY_FILE, key_pem(new_key), 0o600))
    files += [
        (CERT_FILE, pem_of(chain), 0o644),
        (STATE_FILE, state_bytes(state), 0o600),
    ]
    write_files(path, files)
