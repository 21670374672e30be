"""How the client fails: :class:`ClientError`, carrying the exit code it maps to.

Exit codes: 0 ok, 1 the server or the CA refused (or redirected), 2 usage (or a local
file problem: a directory, key or state others can write, a link in the directory, a
token over http:// without --insecure), 3 network (or no certificate before --timeout),
4 renewed but --reload-command failed.
"""

from __future__ import annotations

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_NETWORK, EXIT_RELOAD = 0, 1, 2, 3, 4


class ClientError(Exception):
    """A failure with the exit code it maps to (and the HTTP status, when there was one)."""

    def __init__(self, message: str, exit_code: int, status: int | None = None) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.status = status
