"""Renew: install a newer chain the server already has, or ask for a new one when a
third of the lifetime is left (:func:`renew_if_due`); then run the reload command."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from cryptography import x509

from csrproxy.client.api import DEFAULT_TIMEOUT, Clock, Progress, Server, read_token
from csrproxy.client.chains import verify_chain
from csrproxy.client.directory import (
    STATE_FILE,
    install,
    load_state,
    locked,
    read_chain,
    read_key,
    record_signed,
    state_bytes,
)
from csrproxy.client.errors import ClientError
from csrproxy.client.keys import make_csr, public_key_pem, same_key
from csrproxy.client.transport import Transport, UrllibTransport

# One logger for the whole client, as before the split: the CLI's handler attaches to it.
log = logging.getLogger("csrproxy.client")


@dataclass
class RenewResult:
    """What :func:`renew_if_due` did, and why."""

    action: Literal["unchanged", "fetched-newer", "reissued"]
    reason: str
    not_after: datetime | None
    certificate_id: str | None = None
    retry_after: float | None = None  # the server's hint: look again in that many seconds
    warning: str | None = None  # a failed look-up that did not matter (the cert was not due)
    reloaded: bool = False
    reload_error: str | None = None

    @property
    def changed(self) -> bool:
        return self.action != "unchanged"


def due_reason(current: x509.Certificate | None, now: float, force: bool = False) -> str | None:
    """Why the certificate should be renewed now, or None: missing, forced, or less than
    a third of its lifetime left."""
    if current is None:
        return "no valid certificate for key.pem"
    if force:
        return "--force"
    before = current.not_valid_before_utc.timestamp()
    after = current.not_valid_after_utc.timestamp()
    if after - now < (after - before) / 3:
        return f"{max(0.0, after - now) / 86400:.2f} days left of {(after - before) / 86400:.2f}"
    return None


def renew_if_due(
    directory: str | Path,
    *,
    now: Clock | None = None,
    sleep: Callable[[float], None] | None = None,
    reload_command: str | None = None,
    reload_timeout: float = 120.0,
    force: bool = False,
    token: str | None = None,
    timeout: float | None = None,
    insecure: bool = False,
    transport: Transport | None = None,
    progress: Progress | None = None,
) -> RenewResult:
    """Keep ``directory`` (made by :func:`~csrproxy.client.obtain.obtain_certificate`) valid.

    Asks the server for the newest chain of the stored certificate id and installs it when
    it is newer (same key, valid, later notAfter); else, when less than a third of the
    lifetime is left (or ``force``), posts a CSR from the same key and names again.  A
    failed look-up only matters when the certificate is due.  ``reload_command`` runs
    (through the shell) only after the files changed.  The token goes over plain
    ``http://`` only with ``insecure`` (here, or given to issue and kept in the state).
    """
    path = Path(directory)
    clock = now or time.time
    with locked(path) as files:
        state = load_state(files)
        key = read_key(files)
        names = [str(n) for n in state["names"]]
        root = str(state["root_pem"]).encode() if state.get("root_pem") else None
        server = Server(
            str(state["url"]),
            token or read_token(state.get("token_file")),
            transport or UrllibTransport(state.get("cacert")),
            clock,
            sleep or time.sleep,
            progress,
            insecure or state.get("insecure") is True,
        )
        chain = read_chain(files)
        current = chain[0] if chain and same_key(chain[0], key) else None
        result = RenewResult("unchanged", "", current.not_valid_after_utc if current else None)
        result.certificate_id = state.get("certificate_id")
        fresh: list[x509.Certificate] | None = None
        if state.get("certificate_url"):
            try:
                signed = server.certificate(str(state["certificate_url"]))
                result.retry_after = signed.retry_after
                got = verify_chain(signed.pem, key, names, root, clock())
                if current is None or got[0].not_valid_after_utc > current.not_valid_after_utc:
                    fresh, result.action = got, "fetched-newer"
                    result.reason = "the server has a newer certificate"
                    record_signed(state, names, signed)
            except ClientError as e:
                result.warning = str(e)
                log.warning("the server's newest certificate: %s", e)
        if fresh is None:
            why = due_reason(current, clock(), force)
            if why is None:
                assert current is not None
                left = current.not_valid_after_utc.timestamp() - clock()
                result.reason = f"not due: {left / 86400:.2f} days left"
                return result
            log.info("renewing: %s", why)
            if state.get("discover_names"):
                names = server.names(public_key_pem(key), names) or names
            signed = server.sign(
                make_csr(key, names),
                float(timeout or state.get("timeout") or DEFAULT_TIMEOUT),
            )
            got = verify_chain(signed.pem, key, names, root, clock())
            result.retry_after = signed.retry_after
            record_signed(state, names, signed)
            if current is not None and got[0] == current:
                result.reason = f"{why}; the server answered the same certificate"
                files.write(STATE_FILE, state_bytes(state), 0o600)
                return result
            fresh, result.action, result.reason = got, "reissued", why
        install(files, fresh, None, state)
        result.not_after = fresh[0].not_valid_after_utc
        result.certificate_id = state.get("certificate_id")
    if reload_command:
        result.reloaded, result.reload_error = run_reload(reload_command, reload_timeout)
    return result


def run_reload(command: str, timeout: float) -> tuple[bool, str | None]:
    """Run ``command`` through the shell: (True, None), or (False, what went wrong)."""
    log.info("running %s", command)
    try:
        done = subprocess.run(command, shell=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return False, f"{command!r} did not finish within {timeout:g}s"
    except OSError as e:
        return False, f"{command!r}: {e}"
    if done.returncode != 0:
        return False, f"{command!r} exited with {done.returncode}"
    return True, None
