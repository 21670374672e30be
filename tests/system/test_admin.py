"""csrproxy-admin against a real daemon's state (and pebble for revocation)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509

from csrproxy.admin import main
from csrproxy.client import obtain_certificate
from csrproxy.testing.daemon import Csrproxy
from csrproxy.testing.pebble import Pebble
from tests.conftest import ZONE

pytestmark = pytest.mark.integration


def test_list_show_account_and_revoke(
    daemon: Csrproxy, pebble: Pebble, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"admin.{ZONE}"
    got = obtain_certificate(daemon.url, tmp_path, [name], root_pem=pebble.root_pem())
    config = ["--config", str(daemon.config)]

    assert main([*config, "certificates"]) == 0
    listing = capsys.readouterr().out
    assert name in listing
    cert_id = next(line.split()[0] for line in listing.splitlines() if name in line)

    assert main([*config, "orders"]) == 0
    assert name in capsys.readouterr().out

    assert main([*config, "show", cert_id]) == 0
    shown = json.loads(capsys.readouterr().out)["certificate"]
    assert shown["names"] == [name]
    leaf = x509.load_pem_x509_certificates(shown["chain"].encode())[0]
    assert leaf.serial_number == got.leaf.serial_number
    # The id the installation was given (not the row id) finds the same certificate.
    assert got.certificate_id and shown["certificate_id"] == got.certificate_id != cert_id
    assert main([*config, "show", got.certificate_id]) == 0
    assert json.loads(capsys.readouterr().out)["certificate"]["id"] == cert_id

    assert main([*config, "account"]) == 0
    account = json.loads(capsys.readouterr().out)
    with urllib.request.urlopen(daemon.url + "/v1/health", timeout=10) as resp:
        health = json.loads(resp.read())
    assert account["account_url"] == health["account"]
    assert "PRIVATE" not in json.dumps(account)
    assert account["public_key"].startswith("-----BEGIN PUBLIC KEY-----")

    # revoke runs a reactor of its own (task.react): not inside this test process.
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "csrproxy.admin",
            *config,
            "revoke",
            cert_id,
            "--reason",
            "keyCompromise",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "revoked" in done.stdout
    assert main([*config, "show", cert_id]) == 0
    assert json.loads(capsys.readouterr().out)["certificate"]["revoked"] == 1

    assert main([*config, "show", "nonexistent"]) == 1
    assert main(["--config", str(tmp_path / "missing.toml"), "certificates"]) == 2
