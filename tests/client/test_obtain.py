"""Issue: key 0600 and reuse or rotation, the files and their atomic replacement, names
from the server, the token, and the chain checks; a fake server, no sockets, no sleeps."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from csrproxy.client import ClientError
from csrproxy.client.chains import dns_names, pem_of
from csrproxy.client.keys import key_label, load_key, make_csr, public_key_pem, same_key
from csrproxy.client.transport import Response
from tests.client.fakes import (
    CA,
    DAY,
    HTTPS_URL,
    NAME,
    T0,
    URL,
    ZONE_T,
    FakeClock,
    FakeServer,
    cli,
    key_bytes,
    label_of,
    leaf_of,
    obtain,
    problem,
    renew,
)


def test_issue_writes_key_0600_cert_chain_and_state(
    server: FakeServer, clock: FakeClock, tmp_path: Path
) -> None:
    result = obtain(server, clock, tmp_path)
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "csrproxy.json").stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificates((tmp_path / "cert.pem").read_bytes())
    chain = x509.load_pem_x509_certificates((tmp_path / "chain.pem").read_bytes())
    assert [c.subject for c in cert] == [result.leaf.subject, server.ca.intermediate.subject]
    assert chain == cert[1:]
    assert dns_names(result.leaf) == [NAME]
    state = json.loads((tmp_path / "csrproxy.json").read_text())
    assert state["url"] == URL and state["names"] == [NAME] and not state["discover_names"]
    assert state["certificate_id"] == "cert-0" == result.certificate_id
    assert state["certificate_url"] == f"{URL}/v1/certificates/cert-0"
    assert state["key_type"] == "ec256"
    # No Prefer: respond-async: the client asks synchronously first.
    sign = next(r for r in server.requests if r.method == "POST")
    assert "Prefer" not in sign.headers and "Authorization" not in sign.headers
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_key_is_reused_and_rotated_with_new_key(
    server: FakeServer, clock: FakeClock, tmp_path: Path
) -> None:
    first = obtain(server, clock, tmp_path)
    key1 = key_bytes(tmp_path)
    second = obtain(server, clock, tmp_path)
    assert key_bytes(tmp_path) == key1
    assert second.leaf.public_key() == first.leaf.public_key()
    third = obtain(server, clock, tmp_path, new_key=True, key_type="ec384")
    assert key_bytes(tmp_path) != key1
    assert third.leaf.public_key() != first.leaf.public_key()
    key = load_key(tmp_path / "key.pem")
    assert same_key(leaf_of(tmp_path), key)
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600
    assert json.loads((tmp_path / "csrproxy.json").read_text())["key_type"] == "ec384"


def test_failed_rotation_keeps_the_old_key(
    server: FakeServer, clock: FakeClock, tmp_path: Path
) -> None:
    obtain(server, clock, tmp_path)
    before = key_bytes(tmp_path), (tmp_path / "cert.pem").read_bytes()
    server.canned["POST /v1/sign"] = [problem(502, "ca-error")]
    with pytest.raises(ClientError) as e:
        obtain(server, clock, tmp_path, new_key=True)
    assert e.value.exit_code == 1
    assert (key_bytes(tmp_path), (tmp_path / "cert.pem").read_bytes()) == before


@pytest.mark.parametrize("fail", ["replace-cert", "replace-state", "fsync"])
def test_a_crash_mid_write_leaves_the_old_files(
    server: FakeServer,
    clock: FakeClock,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fail: str,
) -> None:
    obtain(server, clock, tmp_path)
    names = ("key.pem", "cert.pem", "chain.pem", "csrproxy.json")
    old = {n: (tmp_path / n).read_bytes() for n in names}
    real_replace, real_fsync = os.replace, os.fsync
    calls = {"fsync": 0}

    def replace(src: Any, dst: Any, **kw: Any) -> None:
        if fail == "replace-cert" and str(dst).endswith("cert.pem") and ".tmp" in str(src):
            raise OSError("disk on fire")
        if fail == "replace-state" and str(dst).endswith("csrproxy.json"):
            raise OSError("disk on fire")
        real_replace(src, dst, **kw)

    def fsync(fd: int) -> None:
        calls["fsync"] += 1
        if fail == "fsync" and calls["fsync"] == 2:  # chain.pem's temp is written, cert's not
            raise OSError("I/O error")
        real_fsync(fd)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError):
        obtain(server, clock, tmp_path, new_key=True)
    monkeypatch.undo()
    assert {n: (tmp_path / n).read_bytes() for n in names} == old
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, ".csrproxy.lock"])


def test_key_names_come_from_the_server(
    server: FakeServer, clock: FakeClock, tmp_path: Path
) -> None:
    result = obtain(server, clock, tmp_path, names=[])
    key = load_key(tmp_path / "key.pem")
    label = label_of(public_key_pem(key))
    assert label == key_label(key)
    assert result.names == [f"{label}.{ZONE_T}"]
    name_req = next(r for r in server.requests if r.url.endswith("/v1/name"))
    assert name_req.method == "GET" and name_req.body == public_key_pem(key)
    assert json.loads((tmp_path / "csrproxy.json").read_text())["discover_names"] is True


def test_only_label_patterns_is_a_usage_error(
    server: FakeServer, clock: FakeClock, tmp_path: Path
) -> None:
    doc = {"names": [f"{{label}}.{ZONE_T}"], "key_label": "x"}
    server.canned["GET /v1/name"] = [Response(200, {}, json.dumps(doc).encode())]
    code, err = cli(server, clock, "issue", "--url", URL, "--dir", str(tmp_path))
    assert code == 2 and "give --name" in err
    assert server.posts() == 0


def test_token_file_is_sent_and_remembered(
    server: FakeServer, clock: FakeClock, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    d = tmp_path / "tls"
    args = ["issue", "--url", HTTPS_URL, "--dir", str(d), "--name", NAME]
    args += ["--token-file", str(token)]
    assert cli(server, clock, *args)[0] == 0
    assert all(r.headers["Authorization"] == "Bearer s3cret" for r in server.requests)
    assert json.loads((d / "csrproxy.json").read_text())["token_file"] == str(token.resolve())
    server.requests.clear()
    renew(server, clock, d)
    assert server.requests[0].headers["Authorization"] == "Bearer s3cret"


@pytest.mark.parametrize(
    "damage",
    ["other-key", "other-names", "bad-order", "not-pem", "expired"],
)
def test_a_bad_chain_is_refused(
    server: FakeServer, clock: FakeClock, tmp_path: Path, ca: CA, damage: str
) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    if damage == "other-key":
        pem = ca.issue(x509.load_pem_x509_csr(make_csr(other, [NAME])), T0, 90)
    elif damage == "other-names":
        obtain(server, clock, tmp_path)
        key = load_key(tmp_path / "key.pem")
        pem = ca.issue(x509.load_pem_x509_csr(make_csr(key, ["x." + ZONE_T])), T0, 90)
    elif damage == "bad-order":
        obtain(server, clock, tmp_path)
        chain = x509.load_pem_x509_certificates((tmp_path / "cert.pem").read_bytes())
        pem = pem_of([chain[0], ca.root])  # the leaf is not signed by the root
    elif damage == "expired":
        obtain(server, clock, tmp_path)
        key = load_key(tmp_path / "key.pem")
        pem = ca.issue(x509.load_pem_x509_csr(make_csr(key, [NAME])), T0 - 100 * DAY, 90)
    else:
        pem = b"<html>proxy error</html>"
    server.canned["POST /v1/sign"] = [Response(200, {}, pem)]
    args = ["issue", "--url", URL, "--dir", str(tmp_path), "--name", NAME]
    code, err = cli(server, clock, *args)
    assert code == 1, err
