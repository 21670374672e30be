"""The API's OpenAPI 3.1 document, ``openapi.json`` beside this module: the one source.

``GET /v1/openapi.json`` serves it as stored; the tests hold the routes, the problem types
and the running daemon's answers to it.
"""

from __future__ import annotations

import json
from functools import cache
from importlib.resources import files
from typing import Any

#: The document's media type as served.
OPENAPI_JSON = b"application/json"


@cache
def openapi_bytes() -> bytes:
    """The document as stored in the package (read once)."""
    return files(__package__).joinpath("openapi.json").read_bytes()


def openapi_document() -> dict[str, Any]:
    """The document, parsed (a new dict each call: callers may change it)."""
    doc: dict[str, Any] = json.loads(openapi_bytes())
    return doc
