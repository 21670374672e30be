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
    # 3: a million installations. Each certificate knows whether it is current (not
    # superseded), when to renew it, its ARI window and when to ask for it again, its sorted
    # names (the new-names budget); finished orders have their own status; admission
    # budgets survive restarts. Every per-pass query runs on a partial index.
    """
    ALTER TABLE certificates ADD COLUMN names_key TEXT;
    ALTER TABLE certificates ADD COLUMN superseded REAL;
    ALTER TABLE certificates ADD COLUMN renew_at REAL;
    ALTER TABLE certificates ADD COLUMN dormant INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE certificates ADD COLUMN ari_start REAL;
    ALTER TABLE certificates ADD COLUMN ari_end REAL;
    ALTER TABLE certificates ADD COLUMN ari_next REAL;
    UPDATE certificates SET names_key = (
        SELECT group_concat(value, ',') FROM (SELECT value FROM json_each(certificates.names)
        ORDER BY value)
    );
    UPDATE certificates SET superseded = created WHERE EXISTS (
        SELECT 1 FROM certificates AS newer
        WHERE newer.request_key = certificates.request_key
        AND (newer.not_after > certificates.not_after
             OR (newer.not_after = certificates.not_after AND newer.rowid > certificates.rowid))
    );
    -- renew_at and ari_next are left NULL: the renewal pass gives them, 2,000 rows a step.
    CREATE INDEX certificates_by_names ON certificates(names_key);
    CREATE INDEX certificates_due ON certificates(renew_at)
        WHERE superseded IS NULL AND revoked IS NULL AND dormant = 0;
    CREATE INDEX certificates_ari_due ON certificates(ari_next)
        WHERE superseded IS NULL AND revoked IS NULL AND dormant = 0;
    CREATE INDEX certificates_gone ON certificates(max(superseded, not_after))
        WHERE superseded IS NOT NULL;
    CREATE INDEX certificates_expiry ON certificates(not_after) WHERE superseded IS NULL;
    UPDATE orders SET status = 'issued' WHERE status = 'valid' AND certificate_id IS NOT NULL;
    DROP INDEX orders_by_status;
    CREATE INDEX orders_unfinished ON orders(created)
        WHERE status IN ('new', 'pending', 'ready', 'processing', 'valid');
    CREATE INDEX orders_finished ON orders(updated) WHERE status IN ('issued', 'invalid');
    CREATE TABLE budgets (
        name TEXT PRIMARY KEY,
        tokens REAL NOT NULL,
        stamp REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # 4: the built-in zone's SOA serial, so that it still rises after a restart that
    # follows a burst of changes (more than one a second runs ahead of the clock).
    """
    CREATE TABLE zones (
        origin TEXT PRIMARY KEY,
        serial INTEGER NOT NULL,
        updated REAL NOT NULL
    ) WITHOUT ROWID;
    """,
    # 5: several instances on one database ([cluster]). Each challenge record names the
    # instance that published it (the others serve it too; a starting instance clears only
    # its own); an order and a renewal are leased by the instance running them (another
    # takes over once the lease ran out); the account key's thumbprint (every instance must
    # hold the same key).
    """
    ALTER TABLE challenges ADD COLUMN instance TEXT;
    ALTER TABLE orders ADD COLUMN owner TEXT;
    ALTER TABLE orders ADD COLUMN lease_until REAL;
    ALTER TABLE certificates ADD COLUMN lease_owner TEXT;
    ALTER TABLE certificates ADD COLUMN lease_until REAL;
    ALTER TABLE account ADD COLUMN key_thumbprint TEXT;
    """,
    # 6: the certificate profile a request asked for (POST /v1/sign "profile"), kept with
    # its order and certificate so that a resumed order and every renewal ask for it again.
    """
    ALTER TABLE orders ADD COLUMN profile TEXT;
    ALTER TABLE certificates ADD COLUMN profile TEXT;
    """,
    # 7: the CA ([acme] or an [[acme.fallback]], by directory URL) an order was placed with
    # and a certificate issued by: a resumed order goes back to it, a renewal asks it first.
    """
    ALTER TABLE orders ADD COLUMN ca TEXT;
    ALTER TABLE certificates ADD COLUMN ca TEXT;
    """,
)

# What PostgreSQL says differently in the steps that rewrite rows (the rest is translated
# by csrproxy.state.engine.postgres_ddl): (step, SQLite's text, PostgreSQL's).
_POSTGRES_REWRITES: Sequence[tuple[int, str, str]] = (
    (
        2,
        "SELECT group_concat(value, ',') FROM (SELECT value FROM json_each(certificates.names)\n"
        "        ORDER BY value)",
        "SELECT string_agg(value, ',' ORDER BY value)\n"
        "        FROM json_array_elements_text(certificates.names::json) AS value",
    ),
    (2, "newer.rowid > certificates.rowid", "newer.id > certificates.id"),
    # Instances share a PostgreSQL database: one running order per CSR, whichever instance
    # places it (an SQLite database may still hold two rows an old run left for one CSR).
    (
        4,
        "ALTER TABLE account ADD COLUMN key_thumbprint TEXT;",
        "ALTER TABLE account ADD COLUMN key_thumbprint TEXT;\n"
        "    CREATE UNIQUE INDEX orders_one_running ON orders(request_key)\n"
        "        WHERE status IN ('new', 'pending', 'ready', 'processing', 'valid');",
    ),
)


def postgres_migration(step: int) -> str:
    """Migration ``step`` (from version ``step`` to ``step + 1``) in the words PostgreSQL
    needs before its types are translated."""
    script = MIGRATIONS[step]
    for index, sqlite_text, postgres_text in _POSTGRES_REWRITES:
        if index == step:
            if sqlite_text not in script:
                raise AssertionError(f"migration {step} no longer says {sqlite_text!r}")
            script = script.replace(sqlite_text, postgres_text)
    return script
