"""Renew: not due, due, a newer chain on the server, the server down, names again, a
missing certificate, and the reload command; a fake server and clock, no sleeps."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from csrproxy.client.chains import dns_names
from csrproxy.client.keys import make_csr
from csrproxy.client.transport import Response
from tests.client.fakes import (
    CA,
    DAY,
    NAME,
    T0,
    URL,
    ZONE_T,
    FakeClock,
    FakeServer,
    cli,
    key_bytes,
    leaf_of,
    obtain,
    renew,
)


def test_renew_does_nothing_when_not_due(
    server: FakeServer, clock: FakeClock, tmp_path: Path
) -> None:
    obtain(server, clock, tmp_path)
    before = (tmp_path / "cert.pem").read_bytes()
    clock.t += 50 * DAY  # 40 of 90 days left: more than a third
    marker = tmp_path / "reloaded"
    result = renew(server, clock, tmp_path, reload_command=f"touch {marker}")
    assert result.action == "unchanged" and not result.changed and not result.reloaded
    assert result.retry_after == 3600.0
    assert (tmp_path / "cert.pem").read_bytes() == before
    assert server.posts() == 1 and not marker.exists()


def test_renew_reissues_when_a_third_is_left(
    server: FakeServer, clock: FakeClock, tmp_path: Path
) -> None:
    first = obtain(server, clock, tmp_path)
    key = key_bytes(tmp_path)
    clock.t += 61 * DAY  # 29 of 90 days left
    marker = tmp_path / "reloaded"
    result = renew(server, clock, tmp_path, reload_command=f"echo x >> {marker}")
    assert result.action == "reissued" and result.reloaded and result.reload_error is None
    assert marker.read_text() == "x\n"
    assert server.posts() == 2 and key_bytes(tmp_path) == key
    leaf = leaf_of(tmp_path)
    assert leaf.not_valid_after_utc > first.leaf.not_valid_after_utc
    assert leaf.public_key() == first.leaf.public_key()
    assert result.not_after == leaf.not_valid_after_utc
    # Next run: not due again.
    assert renew(server, clock, tmp_path).action == "unchanged"


def test_renew_fetches_the_newer_chain_from_the_server(
    server: FakeServer, clock: FakeClock, tmp_path: Path
) -> None:
    first = obtain(server, clock, tmp_path)
    clock.t += 30 * DAY  # not due for the client: the server renewed on its own
    server.renew_on_server("cert-0")
    marker = tmp_path / "reloaded"
    result = renew(server, clock, tmp_path, reload_command=f"touch {marker}")
    assert result.action == "fetched-newer" and marker.exists()
    assert server.posts() == 1
    assert leaf_of(tmp_path).not_valid_after_utc > first.leaf.not_valid_after_utc
    assert server.requests[-1].url == f"{URL}/v1/certificates/cert-0"
    assert x509.load_pem_x509_certificates((tmp_path / "chain.pem").read_bytes()) == [
        server.ca.intermediate
    ]


def test_renew_with_force_and_cli(server: FakeServer, clock: FakeClock, tmp_path: Path) -> None:
    obtain(server, clock, tmp_path)
    code, err = cli(server, clock, "renew", "--dir", str(tmp_path))
    assert code == 0 and "unchanged" in err and server.posts() == 1
    clock.t += 1
    code, err = cli(server, clock, "renew", "--dir", str(tmp_path), "--force")
    assert code == 0 and "reissued" in err and server.posts() == 2


def test_renew_when_the_server_is_down(
    server: FakeServer, clock: FakeClock, tmp_path: Path
) -> None:
    obtain(server, clock, tmp_path)
    server.down = True
    result = renew(server, clock, tmp_path)  # not due: a warning, nothing else
    assert result.action == "unchanged" and result.warning and "cannot reach" in result.warning
    clock.t += 80 * DAY
    code, _ = cli(server, clock, "renew", "--dir", str(tmp_path))
    assert code == 3


def test_renew_ignores_a_fetched_chain_for_another_key(
    server: FakeServer, clock: FakeClock, tmp_path: Path, ca: CA
) -> None:
    obtain(server, clock, tmp_path)
    other = ec.generate_private_key(ec.SECP256R1())
    pem = ca.issue(x509.load_pem_x509_csr(make_csr(other, [NAME])), T0 + DAY, 90)
    server.canned["GET /v1/certificates/cert-0"] = [Response(200, {}, pem)]
    clock.t += DAY
    result = renew(server, clock, tmp_path)
    assert result.action == "unchanged" and "not our key" in (result.warning or "")


def test_renew_rediscovers_key_names(server: FakeServer, clock: FakeClock, tmp_path: Path) -> None:
    first = obtain(server, clock, tmp_path, names=[])
    clock.t += 70 * DAY
    result = renew(server, clock, tmp_path)
    assert result.action == "reissued"
    assert dns_names(leaf_of(tmp_path)) == first.names


def test_renew_repairs_a_missing_certificate(
    server: FakeServer, clock: FakeClock, tmp_path: Path
) -> None:
    obtain(server, clock, tmp_path)
    (tmp_path / "cert.pem").unlink()
    result = renew(server, clock, tmp_path)
    # The server's newest chain is as good as any: no new order.
    assert result.action == "fetched-newer" and server.posts() == 1
    assert (tmp_path / "cert.pem").exists()


def test_reload_failure_is_exit_4(server: FakeServer, clock: FakeClock, tmp_path: Path) -> None:
    obtain(server, clock, tmp_path)
    clock.t += 70 * DAY
    code, err = cli(server, clock, "renew", "--dir", str(tmp_path), "--reload-command", "exit 7")
    assert code == 4 and "exited with 7" in err
    assert leaf_of(tmp_path).not_valid_after_utc.timestamp() > T0 + 90 * DAY


def test_reload_timeout(server: FakeServer, clock: FakeClock, tmp_path: Path) -> None:
    obtain(server, clock, tmp_path)
    clock.t += 70 * DAY
    result = renew(server, clock, tmp_path, reload_command="sleep 5", reload_timeout=0.05)
    assert result.action == "reissued" and "did not finish" in (result.reload_error or "")


def test_renew_keeps_a_name_in_the_second_zone(
    server: FakeServer, clock: FakeClock, tmp_path: Path
) -> None:
    # [dns] zones: the first zone was full when the installation started ...
    server.zones = [ZONE_T, "go-other.example.net"]
    server.full = {ZONE_T}
    first = obtain(server, clock, tmp_path, names=[])
    assert [n.split(".", 1)[1] for n in first.names] == ["go-other.example.net"]
    # ... and has room again at renewal: the installation keeps its name and zone.
    server.full = set()
    clock.t += 70 * DAY
    assert renew(server, clock, tmp_path).action == "reissued"
    assert dns_names(leaf_of(tmp_path)) == first.names
    asked = [r.url for r in server.requests if "/v1/name" in r.url]
    assert asked[-1].endswith("/v1/name?current=" + first.names[0])
