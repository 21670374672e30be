"""The installation's side: get a certificate for this installation and keep it valid.

``csrproxy-client issue`` runs :func:`~csrproxy.client.obtain.obtain_certificate`;
``csrproxy-client renew`` runs :func:`~csrproxy.client.renew.renew_if_due`.  This module
is the command line: arguments, exit codes, what is printed and logged.

Exit codes: 0 ok, 1 the server or the CA refused (or redirected), 2 usage (or a local
file problem: a directory, key or state others can write, a link in the directory, a
token over http:// without --insecure), 3 network (or no certificate before --timeout),
4 renewed but --reload-command failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from csrproxy.client.api import DEFAULT_TIMEOUT, Clock, Progress
from csrproxy.client.chains import dns_names
from csrproxy.client.errors import EXIT_OK, EXIT_RELOAD, EXIT_USAGE, ClientError
from csrproxy.client.keys import KEY_TYPES
from csrproxy.client.obtain import Obtained, obtain_certificate
from csrproxy.client.renew import renew_if_due
from csrproxy.client.terminal import TerminalLogHandler, TerminalProgress
from csrproxy.client.transport import Transport

# One logger for the whole client, as before the split: main's handler attaches to it.
log = logging.getLogger("csrproxy.client")


def describe(result: Obtained) -> str:
    """What ``issue`` prints: the leaf's subject, names, issuer, validity, and the files."""
    leaf = result.leaf
    return "\n".join(
        [
            f"subject:     {leaf.subject.rfc4514_string() or '(empty)'}",
            f"SANs:        {', '.join(dns_names(leaf))}",
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
    common.add_argument(
        "--insecure",
        action="store_true",
        help="allow sending the token over plain http:// (a network you trust only; "
        "issue remembers it for renew; https:// checks stay on)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    issue = sub.add_parser("issue", parents=[common], help="get a certificate now")
    issue.add_argument("--url", required=True, help="csrproxy's base URL")
    issue.add_argument("--name", action="append", default=[], help="DNS name (repeatable)")
    issue.add_argument("--key-type", default="ec256", choices=KEY_TYPES)
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
    """``csrproxy-client``: run the command in ``argv`` and return its exit code."""
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    err = stderr or sys.stderr
    progress = TerminalProgress(err) if err.isatty() and not args.quiet else None
    handler, level = TerminalLogHandler(err, progress), log.level
    log.addHandler(handler)
    log.setLevel(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    try:
        return _run(args, transport, now, sleep, progress)
    except ClientError as e:
        log.error("%s", e)
        return e.exit_code
    except OSError as e:
        log.error("%s", e)
        return EXIT_USAGE
    finally:
        if progress is not None:
            progress("")
        log.removeHandler(handler)
        log.setLevel(level)


def _run(
    args: argparse.Namespace,
    transport: Transport | None,
    now: Clock | None,
    sleep: Callable[[float], None] | None,
    progress: Progress | None,
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
            timeout=args.timeout or DEFAULT_TIMEOUT,
            insecure=args.insecure,
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
        insecure=args.insecure,
        transport=transport,
        progress=progress,
    )
    until = f" (valid until {result.not_after:%Y-%m-%d %H:%M} UTC)" if result.not_after else ""
    log.info("%s: %s%s", result.action, result.reason, until)
    if result.reload_error:
        log.error("the certificate changed but the reload failed: %s", result.reload_error)
        return EXIT_RELOAD
    return EXIT_OK
