"""``csrproxy-admin``: read the state for operators, revoke, export the account.

    csrproxy-admin --config FILE certificates            list issued certificates
    csrproxy-admin --config FILE orders [--unfinished]    list orders
    csrproxy-admin --config FILE show ID                  one certificate or order, as JSON
    csrproxy-admin --config FILE revoke ID [--reason R]   revoke a certificate at the CA
    csrproxy-admin --config FILE account                  account URL and public key (for CAA)

``ID`` is a certificate's row id (as listed), an order id, or the certificate id an
installation was given (``CSRProxy-Certificate-Id``: its newest certificate).  The
private key is never printed.  Exit codes: 0 ok, 1 failed, 2 usage.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from collections.abc import Sequence
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from csrproxy.acme.client import REVOCATION_REASONS
from csrproxy.acme.jws import AccountKey
from csrproxy.config import Config, load_config
from csrproxy.errors import ConfigError
from csrproxy.issuance.ledger import CERTIFICATE_ID_SECRET, CertificateIds
from csrproxy.state.database import UNFINISHED, CertificateRow, OrderRow, StateDB
from csrproxy.state.store import StateDir


def _when(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _ids(db: StateDB) -> CertificateIds | None:
    """The daemon's certificate ids (None before its first start made the secret)."""
    secret = db.existing_secret(CERTIFICATE_ID_SECRET)
    return CertificateIds(secret) if secret is not None else None


def _cert_doc(c: CertificateRow, ids: CertificateIds | None = None) -> dict[str, Any]:
    return {
        "id": c.id,
        "certificate_id": ids.of(c.request_key) if ids is not None else None,
        "names": c.names,
        "not_before": _when(c.not_before),
        "not_after": _when(c.not_after),
        "order_id": c.order_id,
        "acme_url": c.acme_url,
        "spki_sha256": c.spki_sha256,
        "last_requested": _when(c.last_requested),
        "revoked": c.revoked,
        "signed_by": c.signed_by,
        "chain": c.chain,
    }


def _order_doc(o: OrderRow) -> dict[str, Any]:
    return {
        "id": o.id,
        "names": o.names,
        "status": o.status,
        "acme_url": o.acme_url,
        "error": o.error,
        "certificate_id": o.certificate_id,
        "created": _when(o.created),
        "updated": _when(o.updated),
    }


def list_certificates(db: StateDB) -> str:
    rows = [f"{'id':<24} {'not after':<21} {'revoked':<8} names"]
    for c in db.certificates():
        rev = "" if c.revoked is None else str(c.revoked)
        rows.append(f"{c.id:<24} {_when(c.not_after):<21} {rev:<8} {','.join(c.names)}")
    return "\n".join(rows)


def list_orders(db: StateDB, unfinished: bool) -> str:
    rows = [f"{'id':<24} {'status':<11} {'updated':<21} names"]
    for o in db.orders(UNFINISHED if unfinished else None):
        rows.append(f"{o.id:<24} {o.status:<11} {_when(o.updated):<21} {','.join(o.names)}")
    return "\n".join(rows)


def show(db: StateDB, item: str) -> dict[str, Any] | None:
    ids = _ids(db)
    cert = db.certificate(item)
    if cert is not None:
        return {"certificate": _cert_doc(cert, ids)}
    order = db.order(item)
    if order is not None:
        return {"order": _order_doc(order)}
    if ids is not None:
        for key in {c.request_key for c in db.certificates()}:
            if ids.of(key) == item and (cert := db.newest_certificate(key)) is not None:
                return {"certificate": _cert_doc(cert, ids)}
    return None


def account_info(config: Config, state: StateDir, db: StateDB) -> dict[str, Any]:
    """The account URL and public key; the private key stays where it is."""
    pem = state.read_account_key()
    if pem is None:
        raise ConfigError("state.dir", f"no account key in {state.path}")
    key = AccountKey.from_pem(pem)
    public = key.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    row = db.account(config.acme.directory)
    url = row["url"] if row else None
    doc: dict[str, Any] = {
        "directory": config.acme.directory,
        "account_url": url,
        "public_key": public.decode(),
        "jwk_thumbprint": key.thumbprint,
    }
    if url:
        doc["caa_example"] = f'0 issue "<your CA>; accounturi={url}"'
    return doc


def revoke(config: Config, state: StateDir, db: StateDB, cert_id: str, reason: str) -> str:
    """Revoke through the ACME client, on a reactor of its own."""
    row = db.certificate(cert_id)
    if row is None:
        raise LookupError(f"no certificate {cert_id}")
    pem = state.read_account_key()
    if pem is None:
        raise ConfigError("state.dir", f"no account key in {state.path}")
    leaf = x509.load_pem_x509_certificates(row.chain.encode())[0]
    der = leaf.public_bytes(serialization.Encoding.DER)

    from twisted.internet import defer, task

    from csrproxy.acme.client import ACMEClient
    from csrproxy.http import make_http_client

    async def run(reactor: Any) -> None:
        client = ACMEClient(
            reactor,
            make_http_client(reactor, config.acme.ca_certs),
            config.acme.directory,
            AccountKey.from_pem(pem),
        )
        await client.account()
        await client.revoke(der, reason)

    task.react(lambda reactor: defer.Deferred.fromCoroutine(run(reactor)))
    return "unreachable"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="csrproxy-admin", description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", default="/etc/csrproxy/csrproxy.toml")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("certificates", help="list issued certificates")
    orders = sub.add_parser("orders", help="list orders")
    orders.add_argument("--unfinished", action="store_true")
    show_p = sub.add_parser("show", help="one certificate or order as JSON")
    show_p.add_argument("id")
    rev = sub.add_parser("revoke", help="revoke a certificate at the CA")
    rev.add_argument("id")
    rev.add_argument("--reason", default="unspecified", choices=sorted(REVOCATION_REASONS))
    sub.add_parser("account", help="the ACME account URL and public key (never the private key)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return 2 if e.code else 0
    try:
        config = load_config(args.config)
        state = StateDir(config.state.dir)
        db = state.open_db()
    except ConfigError as e:
        print(f"csrproxy-admin: {e}", file=sys.stderr)
        return 2
    try:
        if args.command == "certificates":
            print(list_certificates(db))
        elif args.command == "orders":
            print(list_orders(db, args.unfinished))
        elif args.command == "show":
            doc = show(db, args.id)
            if doc is None:
                print(f"csrproxy-admin: no certificate or order {args.id}", file=sys.stderr)
                return 1
            print(json.dumps(doc, indent=2))
        elif args.command == "account":
            print(json.dumps(account_info(config, state, db), indent=2))
        elif args.command == "revoke":
            revoke(config, state, db, args.id, args.reason)
        return 0
    except SystemExit as e:  # task.react ends with SystemExit
        if e.code == 0 and args.command == "revoke":
            db.mark_revoked(args.id, REVOCATION_REASONS[args.reason])
            print(f"revoked {args.id} ({args.reason})")
        return int(e.code or 0)
    except (LookupError, ConfigError, ValueError) as e:
        print(f"csrproxy-admin: {e}", file=sys.stderr)
        return 1
    finally:
        db.close()


if __name__ == "__main__":
    sys.exit(main())
