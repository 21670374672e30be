"""The state database's schema, as the steps that build and upgrade it (``PRAGMA user_version``
counts the steps applied)."""

from __future__ import annotations

from collections.abc import Sequence

#: Each entry migrates the schema from version i to i + 1.
MIGRATIONS: Sequence[str] = (
    """
    CREATE TABLE account (
        directory TEXT PRIMARY KEY,
        url TEXT NOT NULL,
        key_file TEXT NOT NULL,
        created REAL NOT NULL
    );
    CREATE TABLE orders (
        id TEXT PRIMARY KEY,
        request_key TEXT NOT NULL,
        csr BLOB NOT NULL,
        names TEXT NOT NULL,
        acme_url TEXT,
        status TEXT NOT NULL,
        error TEXT,
        certificate_id TEXT,
        replaces TEXT,
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE INDEX orders_by_status ON orders(status);
    CREATE INDEX orders_by_request ON orders(request_key);
    CREATE TABLE certificates (
        id TEXT PRIMARY KEY,
        request_key TEXT NOT NULL,
        csr BLOB NOT NULL,
        names TEXT NOT NULL,
        spki_sha256 TEXT NOT NULL,
        chain TEXT NOT NULL,
        not_before REAL NOT NULL,
        not_after REAL NOT NULL,
        order_id TEXT,
        acme_url TEXT,
        created REAL NOT NULL,
        last_requested REAL NOT NULL,
        revoked INTEGER
    );
    CREATE INDEX certificates_by_request ON certificates(request_key, not_after);
    CREATE TABLE challenges (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        order_id TEXT NOT NULL,
        name TEXT NOT NULL,
        value TEXT NOT NULL,
        backend TEXT NOT NULL,
        created REAL NOT NULL
    );
    """,
    # 2: server-side secrets (the certificate ids' key), and who signed each certificate.
    """
    CREATE TABLE secrets (
        name TEXT PRIMARY KEY,
        value BLOB NOT NULL,
        created REAL NOT NULL
    );
    ALTER TABLE certificates ADD COLUMN signed_by TEXT;
    """,
)
