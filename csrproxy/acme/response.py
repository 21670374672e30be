"""One answer of the CA, as the ACME client reads it: status, headers, body, links."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urljoin

from csrproxy.acme.problems import ACMEProtocolError


class ACMEResponse:
    """What the client keeps of one CA answer."""

    def __init__(
        self, url: str, status: int, headers: Mapping[str, list[str]], body: bytes
    ) -> None:
        self.url = url
        self.status = status
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    @property
    def location(self) -> str | None:
        """The ``Location`` header, a relative reference resolved against the request URL."""
        value = self.header("location")
        return urljoin(self.url, value) if value else value

    def json(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.body)
        except ValueError as e:
            raise ACMEProtocolError(f"{self.url}: answer is not JSON: {e}") from e
        if not isinstance(doc, dict):
            raise ACMEProtocolError(f"{self.url}: answer is not a JSON object")
        return doc

    def links(self, rel: str) -> list[str]:
        """URLs of ``Link: <url>;rel="rel"`` headers."""
        out = []
        for value in self.headers.get("link", []):
            for part in value.split(","):
                url, _, params = part.partition(";")
                flat = params.replace(" ", "")
                if f'rel="{rel}"' in flat or f"rel={rel}" in flat.split(";"):
                    out.append(url.strip().strip("<>"))
        return out
