"""The installation's side: make a key and CSR, POST it, check and store the chain.

This module imports nothing from the server side.  It is used as a library
(:func:`obtain_certificate`) and as the ``csrproxy-client`` command.

Exit codes: 0 ok, 1 the server or the CA refused, 2 usage, 3 network.
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

KEY_FILE = "key.pem"
CERT_FILE = "cert.pem"
CHAIN_FILE = "chain.pem"

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_NETWORK = 0, 1, 2, 3

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class ClientError(Exception):
    """A failure with the exit code it maps to."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Obtained:
    names: list[str]
    key_path: Path
    cert_path: Path
    chain_path: Path
    leaf: x509.Certificate
    chain: list[x509.Certificate]


def generate_key(key_type: str = "ec256") -> PrivateKey:
    if key_type == "ec256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type in ("rsa2048", "rsa3072", "rsa4096"):
        return rsa.generate_private_key(65537, int(key_type[3:]))
    raise ClientError(f"unknown key type {key_type!r}", EXIT_USAGE)


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old or the new file, never a part."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_or_make_key(directory: Path, key_type: str, new_key: bool = False) -> PrivateKey:
    path = directory / KEY_FILE
    if path.exists() and not new_key:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, PrivateKey):
            raise ClientError(f"{path} holds an unsupported key type", EXIT_USAGE)
        return key
    key = generate_key(key_type)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_atomic(path, pem, 0o600)
    return key


def make_csr(key: PrivateKey, names: Sequence[str]) -> bytes:
    builder = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def post_csr(url: str, csr_pem: bytes, cafile: str | None = None, timeout: float = 120) -> bytes:
    """POST the CSR to ``url`` (the server's base URL or its /v1/sign); return the PEM chain."""
    endpoint = url if url.rstrip("/").endswith("/v1/sign") else url.rstrip("/") + "/v1/sign"
    req = urllib.request.Request(
        endpoint, data=csr_pem, method="POST", headers={"Content-Type": "application/pkcs10"}
    )
    context = ssl.create_default_context(cafile=cafile) if endpoint.startswith("https") else None
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            body: bytes = resp.read()
            return body
    except urllib.error.HTTPError as e:
        detail = e.read().decode("utf-8", "replace")
        try:
            doc = json.loads(detail)
            detail = f"{doc.get('detail', detail)} ({doc.get('type', '')})"
        except ValueError:
            pass
        raise ClientError(f"server answered {e.code}: {detail}", EXIT_REFUSED) from e
    except (urllib.error.URLError, OSError) as e:
        raise ClientError(f"cannot reach {endpoint}: {e}", EXIT_NETWORK) from e


def discover_names(
    url: str, csr_or_key: bytes, cafile: str | None = None, timeout: float = 30
) -> list[str]:
    """Ask the server which names its policy allows for this key (``GET /v1/name`` with a
    CSR or PEM public key as the body); patterns still holding ``{label}`` are left out,
    since only the client can choose a label."""
    endpoint = url.rstrip("/").removesuffix("/v1/sign") + "/v1/name"
    req = urllib.request.Request(
        endpoint, data=csr_or_key, method="GET", headers={"Content-Type": "application/pkcs10"}
    )
    context = ssl.create_default_context(cafile=cafile) if endpoint.startswith("https") else None
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        raise ClientError(f"server answered {e.code} to {endpoint}", EXIT_REFUSED) from e
    except (urllib.error.URLError, OSError) as e:
        raise ClientError(f"cannot reach {endpoint}: {e}", EXIT_NETWORK) from e
    except ValueError as e:
        raise ClientError(f"{endpoint} did not answer JSON: {e}", EXIT_REFUSED) from e
    names = doc.get("names") if isinstance(doc, dict) else None
    if not isinstance(names, list):
        raise ClientError(f"{endpoint} gave no name list", EXIT_REFUSED)
    return [str(n) for n in names if isinstance(n, str) and "{" not in n]


def public_key_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def verify_chain(
    pem: bytes, key: PrivateKey, names: Sequence[str], root_pem: bytes | None = None
) -> list[x509.Certificate]:
    """Check the leaf carries our key and names and each cert is signed by the next."""
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise ClientError(f"the server's answer is not a PEM chain: {e}", EXIT_REFUSED) from e
    leaf = chain[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(
        serialization.Encoding.DER, spki
    ) != key.public_key().public_bytes(serialization.Encoding.DER, spki):
        raise ClientError("the certificate's key is not the key we made", EXIT_REFUSED)
    got = sorted(
        str(n)
        for n in leaf.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.DNSName)
    )
    if got != sorted(n.lower() for n in names):
        raise ClientError(f"the certificate names {got}, not {sorted(names)}", EXIT_REFUSED)
    issuers = chain[1:] + ([x509.load_pem_x509_certificate(root_pem)] if root_pem else [])
    for child, parent in zip(chain, issuers, strict=False):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise ClientError(
                f"{child.subject.rfc4514_string()} is not issued by "
                f"{parent.subject.rfc4514_string()}: {e}",
                EXIT_REFUSED,
            ) from e
    return chain


def obtain_certificate(
    url: str,
    directory: str | Path,
    names: Sequence[str],
    *,
    key_type: str = "ec256",
    new_key: bool = False,
    cafile: str | None = None,
    root_pem: bytes | None = None,
) -> Obtained:
    """Make (or reuse) the key in ``directory``, get a chain for ``names`` and store it.

    Without ``names``, the server is asked which names its policy gives this key.
    """
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = load_or_make_key(path, key_type, new_key)
    if not names:
        names = discover_names(url, public_key_pem(key), cafile)
        if not names:
            raise ClientError(
                "the server's policy gives this key no name of its own; give --name", EXIT_USAGE
            )
    pem = post_csr(url, make_csr(key, names), cafile)
    chain = verify_chain(pem, key, names, root_pem)
    leaf_pem = chain[0].public_bytes(serialization.Encoding.PEM)
    rest = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain[1:])
    write_atomic(path / CHAIN_FILE, rest)
    write_atomic(path / CERT_FILE, leaf_pem + rest)
    return Obtained(
        list(names), path / KEY_FILE, path / CERT_FILE, path / CHAIN_FILE, chain[0], chain
    )


def describe(result: Obtained) -> str:
    leaf = result.leaf
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    lines = [
        f"subject:   {leaf.subject.rfc4514_string()}",
        f"SANs:      {', '.join(sans.get_values_for_type(x509.DNSName))}",
        f"issuer:    {leaf.issuer.rfc4514_string()}",
        f"validity:  {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S} to "
        f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC",
        f"chain:     {len(result.chain)} certificate(s)",
        f"key:       {result.key_path}",
        f"cert:      {result.cert_path} (leaf + chain)",
        f"chain:     {result.chain_path}",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="csrproxy-client", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    issue = sub.add_parser("issue", help="get a certificate for this installation")
    issue.add_argument("--url", required=True, help="csrproxy's base URL")
    issue.add_argument("--dir", required=True, help="where the key and certificate live")
    issue.add_argument(
        "--name",
        action="append",
        default=[],
        help="a DNS name (repeatable); without it, ask the server (GET /v1/name)",
    )
    issue.add_argument(
        "--key-type", default="ec256", choices=["ec256", "ec384", "rsa2048", "rsa3072", "rsa4096"]
    )
    issue.add_argument("--new-key", action="store_true", help="make a new key even if one exists")
    issue.add_argument("--cacert", help="CA file to trust for an https:// --url")
    issue.add_argument("--root", help="PEM root the chain must lead to (checked when given)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return EXIT_USAGE if e.code else EXIT_OK
    try:
        root = Path(args.root).read_bytes() if args.root else None
        result = obtain_certificate(
            args.url,
            args.dir,
            args.name,
            key_type=args.key_type,
            new_key=args.new_key,
            cafile=args.cacert,
            root_pem=root,
        )
    except ClientError as e:
        print(f"csrproxy-client: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"csrproxy-client: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(describe(result))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
