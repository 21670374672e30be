"""Issue: make or reuse the key, build the CSR, have csrproxy sign it, store the checked
chain and what ``renew`` needs (:func:`obtain_certificate`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from csrproxy.client.api import DEFAULT_TIMEOUT, Clock, Progress, Server, read_token
from csrproxy.client.chains import verify_chain
from csrproxy.client.directory import (
    CERT_FILE,
    CHAIN_FILE,
    KEY_FILE,
    install,
    locked,
    read_key,
    record_signed,
)
from csrproxy.client.errors import EXIT_USAGE, ClientError
from csrproxy.client.keys import (
    KEY_TYPES,
    PrivateKey,
    generate_key,
    key_pem,
    key_type_of,
    make_csr,
    public_key_pem,
)
from csrproxy.client.transport import Transport, UrllibTransport

# One logger for the whole client, as before the split: the CLI's handler attaches to it.
log = logging.getLogger("csrproxy.client")


@dataclass
class Obtained:
    """What :func:`obtain_certificate` stored, and where."""

    names: list[str]
    key_path: Path
    cert_path: Path
    chain_path: Path
    leaf: x509.Certificate
    chain: list[x509.Certificate]
    certificate_id: str | None = None
    retry_after: float | None = None


def obtain_certificate(
    url: str,
    directory: str | Path,
    names: Sequence[str] | None = None,
    *,
    key_type: str = "ec256",
    new_key: bool = False,
    token: str | None = None,
    token_file: str | Path | None = None,
    cafile: str | None = None,
    root_pem: bytes | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    insecure: bool = False,
    now: Clock | None = None,
    sleep: Callable[[float], None] | None = None,
    transport: Transport | None = None,
    progress: Progress | None = None,
) -> Obtained:
    """Make (or reuse) the key in ``directory``, get a checked chain for ``names`` and store
    it with ``csrproxy.json`` (what ``renew`` needs).  Without ``names``, the server is asked
    which names its policy gives this key (``{key}``), now and at every renewal.

    The token goes over plain ``http://`` only with ``insecure`` (remembered for renew);
    a ``directory`` (or key.pem, csrproxy.json) that others can write is refused, exit 2."""
    if key_type not in KEY_TYPES:
        raise ClientError(f"unknown key type {key_type!r}", EXIT_USAGE)
    path = Path(directory)
    clock = now or time.time
    server = Server(
        url,
        token or read_token(token_file),
        transport or UrllibTransport(cafile),
        clock,
        sleep or time.sleep,
        progress,
        insecure,
    )
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    with locked(path) as files:
        key_path = path / KEY_FILE
        pending: PrivateKey | None = None
        if files.exists(KEY_FILE) and not new_key:
            key = read_key(files)
        else:
            key = generate_key(key_type)
            if files.exists(KEY_FILE) and files.exists(CERT_FILE):
                pending = key  # rotation: key.pem changes with cert.pem, not before
            else:
                files.write(KEY_FILE, key_pem(key), 0o600)
            log.info("made a new %s key", key_type)
        discover = not names
        wanted = list(names or []) or server.names(public_key_pem(key))
        if not wanted:
            raise ClientError(
                "the server's policy gives this key no name of its own; give --name", EXIT_USAGE
            )
        log.info("asking for %s", ", ".join(wanted))
        signed = server.sign(make_csr(key, wanted), timeout)
        chain = verify_chain(signed.pem, key, wanted, root_pem, clock())
        state: dict[str, Any] = {
            "version": 1,
            "url": server.url,
            "discover_names": discover,
            "key_type": key_type_of(key),
            "token_file": str(Path(token_file).resolve()) if token_file else None,
            "cacert": str(Path(cafile).resolve()) if cafile else None,
            "root_pem": root_pem.decode("ascii") if root_pem else None,
            "timeout": timeout,
            "insecure": insecure,
        }
        record_signed(state, wanted, signed)
        install(files, chain, pending, state)
    return Obtained(
        wanted,
        key_path,
        path / CERT_FILE,
        path / CHAIN_FILE,
        chain[0],
        chain,
        signed.certificate_id,
        signed.retry_after,
    )
