"""The installation's side: get a certificate for this installation and keep it valid.

``csrproxy-client issue`` (or :func:`obtain_certificate`) makes or reuses the key, builds
the CSR, has csrproxy sign it and stores the checked chain; ``csrproxy-client renew`` (or
:func:`renew_if_due`) installs a newer chain the server already has, or asks for a new one
when a third of the lifetime is left.  The package imports nothing from the server side
(stdlib and cryptography only), so an installation needs neither Twisted nor treq.

Modules, one job each: :mod:`~csrproxy.client.errors` (ClientError, exit codes),
:mod:`~csrproxy.client.transport` (one HTTP exchange, urllib), :mod:`~csrproxy.client.api`
(csrproxy's API: sign, names, certificates), :mod:`~csrproxy.client.keys` (key, CSR),
:mod:`~csrproxy.client.chains` (chain checks), :mod:`~csrproxy.client.files` (the
checked directory: no link followed, nobody else writing; atomic writes),
:mod:`~csrproxy.client.directory` (the certificate directory, lock, state),
:mod:`~csrproxy.client.obtain` (issue), :mod:`~csrproxy.client.renew` (renew, reload),
:mod:`~csrproxy.client.terminal` (progress line) and :mod:`~csrproxy.client.cli`.

Exit codes: 0 ok, 1 the server or the CA refused (or redirected), 2 usage (or a local
file problem: a directory, key or state others can write, a link in the directory, a
token over http:// without --insecure), 3 network (or no certificate before --timeout),
4 renewed but --reload-command failed.
"""

from csrproxy.client.cli import describe, main
from csrproxy.client.errors import (
    EXIT_NETWORK,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_RELOAD,
    EXIT_USAGE,
    ClientError,
)
from csrproxy.client.obtain import Obtained, obtain_certificate
from csrproxy.client.renew import RenewResult, due_reason, renew_if_due
from csrproxy.client.terminal import TerminalProgress
from csrproxy.client.transport import Request, Response, Transport, UrllibTransport

__all__ = [
    "EXIT_NETWORK",
    "EXIT_OK",
    "EXIT_REFUSED",
    "EXIT_RELOAD",
    "EXIT_USAGE",
    "ClientError",
    "Obtained",
    "RenewResult",
    "Request",
    "Response",
    "TerminalProgress",
    "Transport",
    "UrllibTransport",
    "describe",
    "due_reason",
    "main",
    "obtain_certificate",
    "renew_if_due",
]
