"""The account key and the JWS that carries every ACME POST (RFC 8555 §6.2)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from josepy.b64 import b64encode
from josepy.jwa import ES256, ES384, HS256, RS256, JWASignature
from josepy.jwk import JWK, JWKEC, JWKRSA

#: Accepted account key types and their JWS algorithms.
KEY_TYPES = ("ec256", "ec384", "rsa2048", "rsa3072", "rsa4096")


class AccountKey:
    """An ACME account key with its JWK and JWS algorithm."""

    def __init__(self, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
        self.key = key
        if isinstance(key, ec.EllipticCurvePrivateKey):
            self.jwk: JWK = JWKEC(key=key.public_key())
            self.alg: JWASignature = {
                "secp256r1": ES256,
                "secp384r1": ES384,
            }[key.curve.name]
        elif isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < 2048:
                raise ValueError("RSA account keys must have at least 2048 bits")
            self.jwk = JWKRSA(key=key.public_key())
            self.alg = RS256
        else:
            raise TypeError(f"unsupported account key type {type(key).__name__}")
        self.public_jwk: dict[str, Any] = self.jwk.to_partial_json()
        self.thumbprint: str = b64encode(self.jwk.thumbprint()).decode("ascii")
        # Every POST signs: the header's fixed parts are serialized once, and the key signs
        # through cryptography directly (the same bytes josepy would produce, less overhead).
        self._alg_json = encode_basestring_ascii(self.alg.name)
        self._jwk_json = json.dumps(self.public_jwk, separators=(",", ":"))
        self._kid = ""
        self._kid_json = '""'
        self._raw_sign = _raw_signer(key)
        # Compared with every order's CSR key (RFC 8555 §11.1).
        self._spki_der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @classmethod
    def generate(cls, key_type: str = "ec256") -> AccountKey:
        if key_type == "ec256":
            return cls(ec.generate_private_key(ec.SECP256R1()))
        if key_type == "ec384":
            return cls(ec.generate_private_key(ec.SECP384R1()))
        if key_type.startswith("rsa"):
            return cls(rsa.generate_private_key(65537, int(key_type[3:])))
        raise ValueError(f"unknown account key type {key_type!r} (known: {', '.join(KEY_TYPES)})")

    @classmethod
    def from_pem(cls, pem: bytes) -> AccountKey:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise ValueError(f"unsupported account key type {type(key).__name__}")
        return cls(key)

    def to_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def spki_der(self) -> bytes:
        return self._spki_der

    def key_authorization(self, token: str) -> str:
        return f"{token}.{self.thumbprint}"

    def sign(
        self,
        payload: Any,
        url: str,
        nonce: str | None,
        kid: str | None,
    ) -> bytes:
        """A flattened JWS; ``payload=None`` is POST-as-GET (empty payload)."""
        # Byte for byte what json.dumps(separators=(",", ":")) makes of the header dict
        # {"alg", "url", ["nonce"], "kid" | "jwk"}, without building and walking the dict.
        parts = ['{"alg":', self._alg_json, ',"url":', encode_basestring_ascii(url)]
        if nonce is not None:
            parts += (',"nonce":', encode_basestring_ascii(nonce))
        if kid is not None:
            if kid != self._kid:
                self._kid, self._kid_json = kid, encode_basestring_ascii(kid)
            parts += (',"kid":', self._kid_json, "}")
        else:
            parts += (',"jwk":', self._jwk_json, "}")
        p64 = _b64("".join(parts).encode())
        body64 = "" if payload is None else _b64json(payload)
        sig64 = _b64(self._raw_sign(f"{p64}.{body64}".encode("ascii")))
        return _envelope(p64, body64, sig64)


def _raw_signer(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> Callable[[bytes], bytes]:
    """The JWS signature function of RFC 7518 §3.3 (RS256) and §3.4 (ES256/ES384)."""
    if isinstance(key, rsa.RSAPrivateKey):
        pkcs1, sha256 = padding.PKCS1v15(), hashes.SHA256()
        return lambda data: key.sign(data, pkcs1, sha256)
    size = (key.curve.key_size + 7) // 8
    ecdsa = ec.ECDSA(hashes.SHA256() if size == 32 else hashes.SHA384())

    def sign(data: bytes) -> bytes:
        r, s = decode_dss_signature(key.sign(data, ecdsa))
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")

    return sign


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64json(obj: Any) -> str:
    return _b64(json.dumps(obj, separators=(",", ":")).encode())


def _envelope(p64: str, body64: str, sig64: str) -> bytes:
    # What json.dumps gives for {"protected", "payload", "signature"}: base64url needs no escaping.
    return f'{{"protected": "{p64}", "payload": "{body64}", "signature": "{sig64}"}}'.encode()


def _flattened(alg: JWASignature, key: Any, protected: dict[str, Any], payload: Any) -> bytes:
    p64 = _b64json(protected)
    body64 = "" if payload is None else _b64json(payload)
    return _envelope(p64, body64, _b64(alg.sign(key, f"{p64}.{body64}".encode("ascii"))))


def eab_jws(account: AccountKey, kid: str, hmac_key: bytes, url: str) -> dict[str, Any]:
    """The externalAccountBinding object for newAccount (RFC 8555 §7.3.4)."""
    protected = {"alg": "HS256", "kid": kid, "url": url}
    return json.loads(_flattened(HS256, hmac_key, protected, account.public_jwk))  # type: ignore[no-any-return]


def eab_binding(kid: str | None, hmac_b64: str | None) -> tuple[str, bytes] | None:
    """The (kid, HMAC key) pair from configuration, or None when EAB is not configured."""
    if kid is None or hmac_b64 is None:
        return None
    return kid, base64.urlsafe_b64decode(hmac_b64 + "=" * (-len(hmac_b64) % 4))
