"""The installation's certificate directory: key.pem (0600), cert.pem (leaf + chain),
chain.pem, csrproxy.json (what ``renew`` needs), and the lock that lets one client in.
Everything in it is reached through a :class:`~csrproxy.client.files.CheckedDirectory`."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography import x509

from csrproxy.client.api import Signed
from csrproxy.client.chains import pem_of
from csrproxy.client.errors import EXIT_USAGE, ClientError
from csrproxy.client.files import CheckedDirectory
from csrproxy.client.keys import PrivateKey, key_pem, parse_key

KEY_FILE, CERT_FILE, CHAIN_FILE, STATE_FILE = "key.pem", "cert.pem", "chain.pem", "csrproxy.json"
LOCK_FILE = ".csrproxy.lock"


@contextmanager
def locked(directory: Path) -> Iterator[CheckedDirectory]:
    """One client at a time in ``directory`` (flock on ``.csrproxy.lock``, which must be a
    regular file, never a link), opened as a :class:`CheckedDirectory`."""
    import fcntl  # here, so the package still imports where there is no fcntl

    try:
        checked = CheckedDirectory(directory)
    except (FileNotFoundError, NotADirectoryError) as e:
        raise ClientError(
            f"no directory {directory}: run `csrproxy-client issue` first", EXIT_USAGE
        ) from e
    with checked:
        fd = checked.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ClientError(f"{directory / LOCK_FILE} is not a regular file", EXIT_USAGE)
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield checked
        finally:
            os.close(fd)


def load_state(directory: CheckedDirectory) -> dict[str, Any]:
    """csrproxy.json of ``directory``; missing, unreadable, incomplete or writable by others
    is a usage error."""
    path = directory.path / STATE_FILE
    data = directory.read(STATE_FILE, secret=True)
    if data is None:
        raise ClientError(f"no {path}: run `csrproxy-client issue` first", EXIT_USAGE)
    try:
        doc = json.loads(data)
    except ValueError as e:
        raise ClientError(f"cannot read {path}: {e}", EXIT_USAGE) from e
    if not isinstance(doc, dict) or not doc.get("url") or not doc.get("names"):
        raise ClientError(f"{path} lacks url or names", EXIT_USAGE)
    return doc


def read_key(directory: CheckedDirectory) -> PrivateKey:
    """key.pem of ``directory``: missing, unreadable, a link or writable by others is a
    usage error."""
    data = directory.read(KEY_FILE, secret=True)
    if data is None:
        raise ClientError(f"no {directory.path / KEY_FILE}", EXIT_USAGE)
    return parse_key(data, directory.path / KEY_FILE)


def read_chain(directory: CheckedDirectory) -> list[x509.Certificate] | None:
    """The certificates in cert.pem, or None when it is missing or not PEM."""
    data = directory.read(CERT_FILE)
    try:
        return x509.load_pem_x509_certificates(data) if data else None
    except ValueError:
        return None


def state_bytes(state: Mapping[str, Any]) -> bytes:
    return json.dumps(dict(state), indent=2, sort_keys=True).encode() + b"\n"


def record_signed(state: dict[str, Any], names: Sequence[str], signed: Signed) -> None:
    """Note in ``state`` the names asked for and the certificate the server named."""
    state["names"] = list(names)
    if signed.certificate_id:
        state["certificate_id"] = signed.certificate_id
        state["certificate_url"] = signed.certificate_url


def install(
    directory: CheckedDirectory,
    chain: list[x509.Certificate],
    new_key: PrivateKey | None,
    state: dict[str, Any],
) -> None:
    """chain.pem, then key.pem (only when rotating), cert.pem, csrproxy.json: see
    :meth:`CheckedDirectory.write_files` for their modes and what a failure or a crash
    leaves."""
    files = [(CHAIN_FILE, pem_of(chain[1:]), 0o644)]
    if new_key is not None:
        files.append((KEY_FILE, key_pem(new_key), 0o600))
    files += [
        (CERT_FILE, pem_of(chain), 0o644),
        (STATE_FILE, state_bytes(state), 0o600),
    ]
    directory.write_files(files)
