"""The client keeps its secrets: no redirect and no other origin gets the token, no token
in the clear without --insecure, keys 0600 whatever was there, no link in the directory
followed, no directory, key or state that others can write; fakes and loopback only."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from csrproxy.client import ClientError, main, obtain_certificate, renew_if_due
from csrproxy.client.transport import Response
from tests.client.fakes import (
    HTTPS_URL,
    NAME,
    URL,
    FakeClock,
    FakeServer,
    cli,
    key_bytes,
    loopback_http,
    obtain,
    renew,
)

TOKEN = "s3cret"


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def private_dir(tmp_path: Path) -> Path:
    d = tmp_path / "tls"
    d.mkdir(mode=0o700)
    return d


# -- redirects and other origins ------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("asked", ["POST /v1/sign", "GET /v1/name"])
def test_a_redirect_never_carries_the_token(tmp_path: Path, asked: str, status: int) -> None:
    """csrproxy on loopback answers a redirect to another port: the token stays, the
    client fails (exit 1) naming the Location."""
    with loopback_http(lambda m, p: (200, {}, b"thanks")) as elsewhere:
        target = elsewhere.url + "/collect"

        def answer(method: str, path: str) -> tuple[int, dict[str, str], bytes]:
            if f"{method} {path}" == asked:
                return status, {"Location": target}, b""
            return 404, {}, b""

        with loopback_http(answer) as server:
            names = [NAME] if asked.startswith("POST") else []
            with pytest.raises(ClientError) as e:
                obtain_certificate(server.url, tmp_path, names, token=TOKEN, insecure=True)
    assert e.value.exit_code == 1 and e.value.status == status
    assert "redirect" in str(e.value) and target in str(e.value)
    assert [f"{s.method} {s.path}" for s in server.seen] == [asked]
    assert server.seen[0].headers["authorization"] == f"Bearer {TOKEN}"
    assert elsewhere.seen == []


def test_a_redirect_is_exit_1_on_the_command_line(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    with (
        loopback_http(lambda m, p: (200, {}, b"")) as elsewhere,
        loopback_http(lambda m, p: (302, {"Location": elsewhere.url + "/"}, b"")) as server,
    ):
        err = io.StringIO()
        argv = ["issue", "--url", server.url, "--dir", str(tmp_path / "tls"), "--name", NAME]
        argv += ["--token-file", str(token), "--insecure"]
        assert main(argv, stderr=err) == 1
    assert f"redirect to {elsewhere.url}/" in err.getvalue() and elsewhere.seen == []


@pytest.mark.parametrize("where", ["202 Location", "order certificate", "stored link"])
def test_a_url_of_another_origin_is_never_asked(
    server: FakeServer, clock: FakeClock, tmp_path: Path, where: str
) -> None:
    other = "https://elsewhere.test/v1/orders/o1"
    if where == "202 Location":
        server.canned["POST /v1/sign"] = [Response(202, {"location": other})]
    elif where == "order certificate":
        server.canned["POST /v1/sign"] = [Response(202, {"location": "/v1/orders/o1"})]
        doc = {"status": "valid", "certificate": other + "/certificate"}
        server.canned["GET /v1/orders/o1"] = [Response(200, {}, json.dumps(doc).encode())]
    if where == "stored link":
        server.chain_headers["link"] = f'<{other}>; rel="csrproxy-certificate"'
        obtain(server, clock, tmp_path, token=TOKEN, insecure=True)
        result = renew(server, clock, tmp_path)
        assert "outside" in (result.warning or "") and result.action == "unchanged"
    else:
        with pytest.raises(ClientError) as e:
            obtain(server, clock, tmp_path, token=TOKEN, insecure=True)
        assert e.value.exit_code == 1 and "outside" in str(e.value)
    assert not [r for r in server.requests if "elsewhere" in r.url]


# -- the token in the clear ---------------------------------------------------------------


def test_a_token_over_http_needs_insecure(
    server: FakeServer, clock: FakeClock, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o600)
    d = tmp_path / "tls"
    args = ["issue", "--url", URL, "--dir", str(d), "--name", NAME, "--token-file", str(token)]
    code, err = cli(server, clock, *args)
    assert code == 2 and "--insecure" in err and "in the clear" in err
    assert server.requests == [] and not d.exists()
    # Over https:// no flag is needed; over http:// --insecure allows it, and renew too.
    assert cli(server, clock, *[HTTPS_URL if a == URL else a for a in args])[0] == 0
    code, err = cli(server, clock, *args, "--new-key", "--insecure")
    assert code == 0, err
    assert json.loads((d / "csrproxy.json").read_text())["insecure"] is True
    server.requests.clear()
    assert cli(server, clock, "renew", "--dir", str(d), "--force")[0] == 0
    assert {r.headers["Authorization"] for r in server.requests} == {f"Bearer {TOKEN}"}


def test_the_python_api_needs_insecure_too(
    server: FakeServer, clock: FakeClock, tmp_path: Path
) -> None:
    with pytest.raises(ClientError) as e:
        obtain(server, clock, tmp_path, token=TOKEN)
    assert e.value.exit_code == 2 and "insecure=True" in str(e.value)
    assert server.requests == []
    obtain(server, clock, tmp_path)  # no token: http:// is fine
    with pytest.raises(ClientError) as e:
        renew_if_due(tmp_path, token=TOKEN, transport=server, now=clock.now, force=True)
    assert e.value.exit_code == 2 and server.posts() == 1
    renew_if_due(tmp_path, token=TOKEN, insecure=True, transport=server, now=clock.now, force=True)
    assert server.posts() == 2


def test_a_token_file_everyone_can_read_is_a_warning(
    server: FakeServer, clock: FakeClock, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    token.chmod(0o644)
    args = ["issue", "--url", HTTPS_URL, "--dir", str(tmp_path / "tls"), "--name", NAME]
    code, err = cli(server, clock, *args, "--token-file", str(token))
    assert code == 0 and "readable by everyone" in err


# -- key modes ----------------------------------------------------------------------------


@pytest.mark.parametrize("with_cert", [True, False], ids=["rotation", "key-only"])
def test_a_new_key_over_a_0644_key_is_0600(
    server: FakeServer, clock: FakeClock, tmp_path: Path, with_cert: bool
) -> None:
    obtain(server, clock, tmp_path)
    (tmp_path / "key.pem").chmod(0o644)
    (tmp_path / "cert.pem").chmod(0o640)
    if not with_cert:
        (tmp_path / "cert.pem").unlink()
    old = key_bytes(tmp_path)
    obtain(server, clock, tmp_path, new_key=True)
    assert key_bytes(tmp_path) != old
    assert mode_of(tmp_path / "key.pem") == 0o600
    assert mode_of(tmp_path / "csrproxy.json") == 0o600
    # A certificate is no secret: it keeps the mode it had.
    assert mode_of(tmp_path / "cert.pem") == (0o640 if with_cert else 0o644)


def test_keys_are_0600_whatever_the_umask(
    server: FakeServer, clock: FakeClock, tmp_path: Path
) -> None:
    old = os.umask(0o277)  # even one that takes the owner's own write bit
    try:
        obtain(server, clock, tmp_path)
    finally:
        os.umask(old)
    assert mode_of(tmp_path / "key.pem") == 0o600
    assert mode_of(tmp_path / "cert.pem") == 0o644


def test_a_key_everyone_can_read_is_a_warning(
    server: FakeServer, clock: FakeClock, tmp_path: Path
) -> None:
    obtain(server, clock, tmp_path)
    (tmp_path / "key.pem").chmod(0o644)
    code, err = cli(server, clock, "renew", "--dir", str(tmp_path))
    assert code == 0 and "key.pem is readable by everyone" in err


# -- links in the directory ------------------------------------------------------------


@pytest.mark.parametrize("command", ["issue", "renew"])
@pytest.mark.parametrize("target_exists", [True, False])
def test_a_symlinked_lock_file_is_refused(
    server: FakeServer, clock: FakeClock, tmp_path: Path, command: str, target_exists: bool
) -> None:
    d = private_dir(tmp_path)
    if command == "renew":
        obtain(server, clock, d)
        (d / ".csrproxy.lock").unlink()
    victim = tmp_path / "etc" / "victim"
    victim.parent.mkdir()
    if target_exists:
        victim.write_text("keep\n")
        victim.chmod(0o644)
    (d / ".csrproxy.lock").symlink_to(victim)
    requests = len(server.requests)
    args = ["--url", URL, "--name", NAME] if command == "issue" else []
    code, err = cli(server, clock, command, "--dir", str(d), *args)
    assert code == 2 and ".csrproxy.lock is a symbolic link" in err
    assert len(server.requests) == requests
    if target_exists:
        assert victim.read_text() == "keep\n" and mode_of(victim) == 0o644
    else:
        assert not victim.exists()
    assert (d / ".csrproxy.lock").is_symlink()


@pytest.mark.parametrize("name", ["key.pem", "csrproxy.json", "cert.pem"])
def test_no_link_in_the_directory_is_read(
    server: FakeServer, clock: FakeClock, tmp_path: Path, name: str
) -> None:
    d = private_dir(tmp_path)
    obtain(server, clock, d)
    planted = tmp_path / name
    os.replace(d / name, planted)
    (d / name).symlink_to(planted)
    code, err = cli(server, clock, "renew", "--dir", str(d), "--force")
    assert code == 2 and f"{name} is a symbolic link" in err


def test_a_link_is_replaced_not_written_through(
    server: FakeServer, clock: FakeClock, tmp_path: Path
) -> None:
    d = private_dir(tmp_path)
    outside = tmp_path / "outside.pem"
    outside.write_text("keep\n")
    (d / "cert.pem").symlink_to(outside)
    (d / "chain.pem").symlink_to(outside)
    obtain(server, clock, d)
    assert outside.read_text() == "keep\n"
    assert not (d / "cert.pem").is_symlink() and not (d / "chain.pem").is_symlink()


def test_lock_and_temporary_files_are_opened_in_the_directory_without_links(
    server: FakeServer, clock: FakeClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[tuple[str, int, Any]] = []
    real_open = os.open

    def record(path: Any, flags: int, mode: int = 0o777, *, dir_fd: Any = None) -> int:
        opened.append((str(path), flags, dir_fd))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", record)
    obtain(server, clock, tmp_path, new_key=True)
    obtain(server, clock, tmp_path, new_key=True)
    monkeypatch.undo()
    created = [(p, f, fd) for p, f, fd in opened if f & os.O_CREAT]
    assert {p for p, _, _ in created if not p.endswith(".tmp")} == {".csrproxy.lock"}
    assert any(p.startswith(".key.pem.") for p, _, _ in created)
    for path, flags, dir_fd in created:
        assert "/" not in path and dir_fd is not None, path
        assert flags & os.O_NOFOLLOW, path
        assert flags & os.O_EXCL or path == ".csrproxy.lock", path


# -- who can write the directory and its secrets ------------------------------------------


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o720, 0o702])
def test_a_directory_others_can_write_is_refused(
    server: FakeServer, clock: FakeClock, tmp_path: Path, mode: int
) -> None:
    d = private_dir(tmp_path)
    d.chmod(mode)
    planted = b"-----BEGIN PRIVATE KEY-----\n"
    code, err = cli(server, clock, "issue", "--url", URL, "--dir", str(d), "--name", NAME)
    assert code == 2 and f"refusing the directory {d}" in err and "chmod go-w" in err
    assert list(d.iterdir()) == [] and server.requests == []
    # Nor is a directory that already holds a certificate renewed once it opens up.
    d.chmod(0o700)
    obtain(server, clock, d)
    (d / "key.pem").write_bytes(planted)  # what someone else could have put there
    d.chmod(mode)
    code, err = cli(server, clock, "renew", "--dir", str(d), "--force")
    assert code == 2 and "refusing the directory" in err and server.posts() == 1


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


@pytest.mark.parametrize("mode", [0o777, 0o770])
def test_a_directory_below_one_others_can_write_is_refused(
    server: FakeServer, clock: FakeClock, tmp_path: Path, mode: int
) -> None:
    # tmp_path/open (others can write it) / tls (ours, 0700): whoever can write "open" can
    # rename "tls" away and put a directory of their own in its place.
    above = tmp_path / "open"
    above.mkdir()
    d = private_dir(above)
    above.chmod(mode)
    code, err = cli(server, clock, "issue", "--url", URL, "--dir", str(d), "--name", NAME)
    assert code == 2 and f"{above} above it is not safe" in err, err
    assert list(d.iterdir()) == [] and server.requests == []
    # Sticky, as /tmp is: others cannot rename or remove what is not theirs.
    above.chmod(mode | stat.S_ISVTX)
    code, err = cli(server, clock, "issue", "--url", URL, "--dir", str(d), "--name", NAME)
    assert code == 0, err


@needs_root
def test_a_directory_owned_by_another_user_is_refused(
    server: FakeServer, clock: FakeClock, tmp_path: Path
) -> None:
    d = private_dir(tmp_path)
    os.chown(d, 4242, -1)
    code, err = cli(server, clock, "issue", "--url", URL, "--dir", str(d), "--name", NAME)
    assert code == 2 and "owned by uid 4242" in err and list(d.iterdir()) == []


@pytest.mark.parametrize("name", ["key.pem", "csrproxy.json"])
@pytest.mark.parametrize("damage", ["0666", "0620", pytest.param("uid 4242", marks=needs_root)])
def test_a_key_or_state_others_can_write_is_refused(
    server: FakeServer, clock: FakeClock, tmp_path: Path, name: str, damage: str
) -> None:
    d = private_dir(tmp_path)
    obtain(server, clock, d)
    if damage.startswith("uid"):
        os.chown(d / name, 4242, -1)
    else:
        (d / name).chmod(int(damage, 8))
    before = key_bytes(d)
    code, err = cli(server, clock, "renew", "--dir", str(d), "--force")
    assert code == 2 and f"refusing the file {d / name}" in err
    if name == "key.pem":  # issue would use it again: refused too
        code, err = cli(server, clock, "issue", "--url", URL, "--dir", str(d), "--name", NAME)
        assert code == 2 and f"refusing the file {d / name}" in err
    assert server.posts() == 1 and key_bytes(d) == before
