"""The installation's side: get a certificate for this installation and keep it valid.

``csrproxy-client issue`` (or :func:`obtain_certificate`) makes or reuses the key, builds
the CSR, has csrproxy sign it and stores the checked chain; ``csrproxy-client renew`` (or
:func:`renew_if_due`) installs a newer chain the server already has, or asks for a new one
when a third of the lifetime is left.  This module imports nothing from the server side.

Exit codes: 0 ok, 1 the server or the CA refused, 2 usage (or a local file problem),
3 network (or no certificate before --timeout), 4 renewed but --reload-command failed.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TextIO

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from csrproxy import clientlib as lib
from csrproxy.clientlib import (
    EXIT_NETWORK,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_RELOAD,
    EXIT_USAGE,
    ClientError,
    Transport,
)

__all__ = ["EXIT_NETWORK", "EXIT_OK", "EXIT_REFUSED", "EXIT_RELOAD", "EXIT_USAGE", "ClientError"]
__all__ += ["Obtained", "RenewResult", "Transport", "main", "obtain_certificate", "renew_if_due"]

Clock = Callable[[], float]


@dataclass
class Obtained:
    names: list[str]
    key_path: Path
    cert_path: Path
    chain_path: Path
    leaf: x509.Certificate
    chain: list[x509.Certificate]
    certificate_id: str | None = None
    retry_after: float | None = None


@dataclass
class RenewResult:
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


def read_token(token_file: str | Path | None) -> str | None:
    if token_file is None:
        return None
    try:
        token = Path(token_file).read_text().strip()
    except OSError as e:
        raise ClientError(f"cannot read the token file: {e}", EXIT_USAGE) from e
    if not token:
        raise ClientError(f"the token file {token_file} is empty", EXIT_USAGE)
    return token


def key_type_of(key: lib.PrivateKey) -> str:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"ec{key.curve.key_size}"
    return f"rsa{key.key_size}"


def _install(
    path: Path, chain: list[x509.Certificate], new_key: lib.PrivateKey | None, state: dict[str, Any]
) -> None:
    """chain.pem, then key.pem (only when rotating), cert.pem, csrproxy.json: see
    :func:`csrproxy.clientlib.write_files` for what a failure or a crash leaves."""
    files = [(lib.CHAIN_FILE, lib.pem_of(chain[1:]), 0o644)]
    if new_key is not None:
        files.append((lib.KEY_FILE, lib.key_pem(new_key), 0o600))
    files += [
        (lib.CERT_FILE, lib.pem_of(chain), 0o644),
        (lib.STATE_FILE, lib.state_bytes(state), 0o600),
    ]
    lib.write_files(path, files)


def _record(state: dict[str, Any], names: Sequence[str], signed: lib.Signed) -> None:
    state["names"] = list(names)
    if signed.certificate_id:
        state["certificate_id"] = signed.certificate_id
        state["certificate_url"] = signed.certificate_url


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
    timeout: float = lib.DEFAULT_TIMEOUT,
    now: Clock | None = None,
    sleep: Callable[[float], None] | None = None,
    transport: Transport | None = None,
    progress: lib.Progress | None = None,
) -> Obtained:
    """Make (or reuse) the key in ``directory``, get a checked chain for ``names`` and store
    it with ``csrproxy.json`` (what ``renew`` needs).  Without ``names``, the server is asked
    which names its policy gives this key (``{key}``), now and at every renewal."""
    if key_type not in lib.KEY_TYPES:
        raise ClientError(f"unknown key type {key_type!r}", EXIT_USAGE)
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    clock = now or time.time
    server = lib.Server(
        url,
        token or read_token(token_file),
        transport or lib.UrllibTransport(cafile),
        clock,
        sleep or time.sleep,
        progress,
    )
    with lib.locked(path):
        key_path = path / lib.KEY_FILE
        pending: lib.PrivateKey | None = None
        if key_path.exists() and not new_key:
            key = lib.load_key(key_path)
        else:
            key = lib.generate_key(key_type)
            if key_path.exists() and (path / lib.CERT_FILE).exists():
                pending = key  # rotation: key.pem changes with cert.pem, not before
            else:
                lib.write_atomic(key_path, lib.key_pem(key), 0o600)
            lib.log.info("made a new %s key", key_type)
        discover = not names
        wanted = list(names or []) or server.names(lib.public_key_pem(key))
        if not wanted:
            raise ClientError(
                "the server's policy gives this key no name of its own; give --name", EXIT_USAGE
            )
        lib.log.info("asking for %s", ", ".join(wanted))
        signed = server.sign(lib.make_csr(key, wanted), timeout)
        chain = lib.verify_chain(signed.pem, key, wanted, root_pem, clock())
        state: dict[str, Any] = {
            "version": 1,
            "url": server.url,
            "discover_names": discover,
            "key_type": key_type_of(key),
            "token_file": str(Path(token_file).resolve()) if token_file else None,
            "cacert": str(Path(cafile).resolve()) if cafile else None,
            "root_pem": root_pem.decode("ascii") if root_pem else None,
            "timeout": timeout,
        }
        _record(state, wanted, signed)
        _install(path, chain, pending, state)
    return Obtained(
        wanted,
        key_path,
        path / lib.CERT_FILE,
        path / lib.CHAIN_FILE,
        chain[0],
        chain,
        signed.certificate_id,
        signed.retry_after,
    )


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
    transport: Transport | None = None,
    progress: lib.Progress | None = None,
) -> RenewResult:
    """Keep ``directory`` (made by :func:`obtain_certificate`) valid.

    Asks the server for the newest chain of the stored certificate id and installs it when
    it is newer (same key, valid, later notAfter); else, when less than a third of the
    lifetime is left (or ``force``), posts a CSR from the same key and names again.  A
    failed look-up only matters when the certificate is due.  ``reload_command`` runs
    (through the shell) only after the files changed.
    """
    path = Path(directory)
    clock = now or time.time
    with lib.locked(path):
        state = lib.load_state(path)
        key = lib.load_key(path / lib.KEY_FILE)
        names = [str(n) for n in state["names"]]
        root = str(state["root_pem"]).encode() if state.get("root_pem") else None
        server = lib.Server(
            str(state["url"]),
            token or read_token(state.get("token_file")),
            transport or lib.UrllibTransport(state.get("cacert")),
            clock,
            sleep or time.sleep,
            progress,
        )
        chain = lib.load_chain(path / lib.CERT_FILE)
        current = chain[0] if chain and lib.same_key(chain[0], key) else None
        result = RenewResult("unchanged", "", current.not_valid_after_utc if current else None)
        result.certificate_id = state.get("certificate_id")
        fresh: list[x509.Certificate] | None = None
        if state.get("certificate_url"):
            try:
                signed = server.certificate(str(state["certificate_url"]))
                result.retry_after = signed.retry_after
                got = lib.verify_chain(signed.pem, key, names, root, clock())
                if current is None or got[0].not_valid_after_utc > current.not_valid_after_utc:
                    fresh, result.action = got, "fetched-newer"
                    result.reason = "the server has a newer certificate"
                    _record(state, names, signed)
            except ClientError as e:
                result.warning = str(e)
                lib.log.warning("the server's newest certificate: %s", e)
        if fresh is None:
            why = due_reason(current, clock(), force)
            if why is None:
                assert current is not None
                left = current.not_valid_after_utc.timestamp() - clock()
                result.reason = f"not due: {left / 86400:.2f} days left"
                return result
            lib.log.info("renewing: %s", why)
            if state.get("discover_names"):
                names = server.names(lib.public_key_pem(key)) or names
            signed = server.sign(
                lib.make_csr(key, names),
                float(timeout or state.get("timeout") or lib.DEFAULT_TIMEOUT),
            )
            got = lib.verify_chain(signed.pem, key, names, root, clock())
            result.retry_after = signed.retry_after
            _record(state, names, signed)
            if current is not None and got[0] == current:
                result.reason = f"{why}; the server answered the same certificate"
                lib.write_atomic(path / lib.STATE_FILE, lib.state_bytes(state), 0o600)
                return result
            fresh, result.action, result.reason = got, "reissued", why
        _install(path, fresh, None, state)
        result.not_after = fresh[0].not_valid_after_utc
        result.certificate_id = state.get("certificate_id")
    if reload_command:
        result.reloaded, result.reload_error = run_reload(reload_command, reload_timeout)
    return result


def run_reload(command: str, timeout: float) -> tuple[bool, str | None]:
    lib.log.info("running %s", command)
    try:
        done = subprocess.run(command, shell=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return False, f"{command!r} did not finish within {timeout:g}s"
    except OSError as e:
        return False, f"{command!r}: {e}"
    if done.returncode != 0:
        return False, f"{command!r} exited with {done.returncode}"
    return True, None


# -- command line ------------------------------------------------------------------------


class TerminalProgress:
    """``\\r waiting for the CA… 3s`` on a terminal, redrawn every second while waiting."""

    def __init__(self, stream: TextIO, interval: float = 1.0) -> None:
        self.stream, self.interval = stream, interval
        self.message, self.started = "", 0.0
        self.lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __call__(self, message: str) -> None:
        with self.lock:
            if message and not self.message:
                self.started = time.monotonic()
            self.message = message
            self.draw() if message else self.clear()
        if message and self._thread is None:
            self._thread = threading.Thread(target=self._tick, daemon=True)
            self._thread.start()
        elif not message and self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._stop.clear()

    def draw(self) -> None:
        elapsed = int(time.monotonic() - self.started)
        self.stream.write(f"\r\x1b[K {self.message}… {elapsed}s")
        self.stream.flush()

    def clear(self) -> None:
        self.stream.write("\r\x1b[K")
        self.stream.flush()

    def _tick(self) -> None:
        while not self._stop.wait(self.interval):
            with self.lock:
                if self.message:
                    self.draw()


class _LogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines on stderr that step around the progress line."""

    def __init__(self, stream: TextIO, progress: TerminalProgress | None) -> None:
        super().__init__(stream)
        self.progress = progress
        self.setFormatter(logging.Formatter("csrproxy-client: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        p = self.progress
        if p is None or not p.message:
            return super().emit(record)
        with p.lock:
            p.clear()
            super().emit(record)
            p.draw()


def describe(result: Obtained) -> str:
    leaf = result.leaf
    return "\n".join(
        [
            f"subject:     {leaf.subject.rfc4514_string() or '(empty)'}",
            f"SANs:        {', '.join(lib.dns_names(leaf))}",
            f"issuer:      {leaf.issuer.rfc4514_string()}",
            f"valid:       {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} to "
            f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC",
            f"chain:       {len(result.chain)} certificate(s)",
            f"certificate: {result.certificate_id or '(the server gave no id)'}",
            f"key:         {result.key_path}",
            f"cert:        {result.cert_path} (leaf + chain)",
            f"chain:       {result.chain_path}",
        ]
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="csrproxy-client",
        description=__doc__.splitlines()[0],
        epilog="exit codes: 0 ok, 1 refused, 2 usage, 3 network or timeout, 4 reload failed",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", required=True, help="where key.pem, cert.pem, chain.pem live")
    common.add_argument("--timeout", type=float, default=None, help="overall deadline, seconds")
    common.add_argument("-q", "--quiet", action="store_true", help="log warnings and errors only")
    common.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = p.add_subparsers(dest="command", required=True)
    issue = sub.add_parser("issue", parents=[common], help="get a certificate now")
    issue.add_argument("--url", required=True, help="csrproxy's base URL")
    issue.add_argument("--name", action="append", default=[], help="DNS name (repeatable)")
    issue.add_argument("--key-type", default="ec256", choices=lib.KEY_TYPES)
    issue.add_argument("--new-key", action="store_true", help="replace an existing key")
    issue.add_argument("--token-file", help="file holding the bearer token")
    issue.add_argument("--cacert", help="CA file to trust for an https:// --url")
    issue.add_argument("--root", help="PEM root the chain must lead to")
    renew = sub.add_parser("renew", parents=[common], help="renew when due (for timers)")
    renew.add_argument("--reload-command", help="shell command to run after a change")
    renew.add_argument("--reload-timeout", type=float, default=120.0)
    renew.add_argument("--force", action="store_true", help="ask for a new certificate now")
    return p


def main(
    argv: Sequence[str] | None = None,
    *,
    transport: Transport | None = None,
    now: Clock | None = None,
    sleep: Callable[[float], None] | None = None,
    stderr: TextIO | None = None,
) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    err = stderr or sys.stderr
    progress = TerminalProgress(err) if err.isatty() and not args.quiet else None
    handler, level = _LogHandler(err, progress), lib.log.level
    lib.log.addHandler(handler)
    lib.log.setLevel(
        logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    )
    try:
        return _run(args, transport, now, sleep, progress)
    except ClientError as e:
        lib.log.error("%s", e)
        return e.exit_code
    except OSError as e:
        lib.log.error("%s", e)
        return EXIT_USAGE
    finally:
        if progress is not None:
            progress("")
        lib.log.removeHandler(handler)
        lib.log.setLevel(level)


def _run(
    args: argparse.Namespace,
    transport: Transport | None,
    now: Clock | None,
    sleep: Callable[[float], None] | None,
    progress: lib.Progress | None,
) -> int:
    if args.timeout is not None and args.timeout <= 0:
        raise ClientError("--timeout must be positive", EXIT_USAGE)
    if args.command == "issue":
        if not args.url.startswith(("http://", "https://")):
            raise ClientError(f"--url {args.url!r} is not an http(s) URL", EXIT_USAGE)
        root = Path(args.root).read_bytes() if args.root else None
        obtained = obtain_certificate(
            args.url,
            args.dir,
            args.name,
            key_type=args.key_type,
            new_key=args.new_key,
            token_file=args.token_file,
            cafile=args.cacert,
            root_pem=root,
            timeout=args.timeout or lib.DEFAULT_TIMEOUT,
            now=now,
            sleep=sleep,
            transport=transport,
            progress=progress,
        )
        if progress is not None:
            progress("")
        if not args.quiet:
            print(describe(obtained))
        return EXIT_OK
    result = renew_if_due(
        args.dir,
        now=now,
        sleep=sleep,
        reload_command=args.reload_command,
        reload_timeout=args.reload_timeout,
        force=args.force,
        timeout=args.timeout,
        transport=transport,
        progress=progress,
    )
    until = f" (valid until {result.not_after:%Y-%m-%d %H:%M} UTC)" if result.not_after else ""
    lib.log.info("%s: %s%s", result.action, result.reason, until)
    if result.reload_error:
        lib.log.error("the certificate changed but the reload failed: %s", result.reload_error)
        return EXIT_RELOAD
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
