"""Bearer tokens, CIDRs and X-Forwarded-For."""

from __future__ import annotations

import io
import sys
from ipaddress import ip_network

from twisted.trial.unittest import SynchronousTestCase

from csrproxy.errors import BadRequest, ClientNotAllowed, ConfigError, Unauthorized
from csrproxy.web.auth import ClientGate, main, parse_tokens, token_hash


class TokenTests(SynchronousTestCase):
    def test_parse_and_check(self) -> None:
        text = f"# tokens\n{token_hash('one')}\n\n{token_hash('two')} {{key}}.go.example.test\n"
        tokens = parse_tokens(text)
        self.assertEqual(len(tokens), 2)
        self.assertIsNone(tokens[0].policy)
        assert tokens[1].policy is not None
        gate = ClientGate(tokens)
        self.assertIs(gate.check_token("Bearer one"), tokens[0])
        self.assertIs(gate.check_token("bearer   two "), tokens[1])
        for bad in (None, "", "Bearer", "Bearer three", "Basic b25lOg==", "one"):
            with self.assertRaises(Unauthorized, msg=bad):
                gate.check_token(bad)
        self.assertTrue(tokens[0].client_id.startswith("token:"))
        self.assertNotIn("one", tokens[0].client_id)

    def test_no_tokens_configured(self) -> None:
        self.assertIsNone(ClientGate().check_token(None))

    def test_bad_lines(self) -> None:
        for text in ("md5:abcd", "sha256:xyz", "sha256:" + "g" * 64, token_hash("a") + " a..b"):
            with self.assertRaises(ConfigError, msg=text):
                parse_tokens(text)

    def test_helper(self) -> None:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        self.assertEqual(main(["new", "{key}.go.example.test"]), 0)
        token = err.getvalue().rsplit(" ", 1)[1].strip()
        line = out.getvalue().strip()
        self.assertEqual(line, f"{token_hash(token)} {{key}}.go.example.test")
        self.patch(sys, "stdin", io.StringIO("abc\n"))
        out.truncate(0)
        out.seek(0)
        self.assertEqual(main(["hash"]), 0)
        self.assertEqual(out.getvalue().strip(), token_hash("abc"))
        self.assertEqual(main([]), 2)


class AddressTests(SynchronousTestCase):
    def test_allow_from(self) -> None:
        gate = ClientGate(allow_from=[ip_network("10.0.0.0/8"), ip_network("2001:db8::/32")])
        gate.check_address("10.1.2.3")
        gate.check_address("2001:db8::1")
        gate.check_address("::ffff:10.0.0.1")
        for bad in ("192.0.2.1", "2001:db9::1", "unix", ""):
            with self.assertRaises(ClientNotAllowed, msg=bad):
                gate.check_address(bad)

    def test_forwarded_for_needs_a_trusted_peer(self) -> None:
        untrusting = ClientGate()
        self.assertEqual(untrusting.client_address("127.0.0.1", ["203.0.113.9"]), "127.0.0.1")
        gate = ClientGate(trusted_proxies=[ip_network("127.0.0.1"), ip_network("10.0.0.0/8")])
        self.assertEqual(gate.client_address("198.51.100.1", ["203.0.113.9"]), "198.51.100.1")
        self.assertEqual(gate.client_address("127.0.0.1", ["203.0.113.9"]), "203.0.113.9")
        # A client cannot smuggle an address in front of the proxies' own entries.
        self.assertEqual(
            gate.client_address("127.0.0.1", ["1.2.3.4, 203.0.113.9", "10.0.0.2"]),
            "203.0.113.9",
        )
        self.assertEqual(gate.client_address("127.0.0.1", []), "127.0.0.1")
        self.assertEqual(gate.client_address("127.0.0.1", None), "127.0.0.1")
        # Every hop trusted: the farthest one sent it.
        self.assertEqual(gate.client_address("127.0.0.1", ["10.0.0.3, 10.0.0.2"]), "10.0.0.3")
        self.assertEqual(gate.client_address("127.0.0.1", ["2001:db8::1"]), "2001:db8::1")
        self.assertEqual(gate.client_address("127.0.0.1", ["[2001:db8::1]"]), "2001:db8::1")
        self.assertEqual(gate.client_address("127.0.0.1", ["::ffff:192.0.2.1"]), "192.0.2.1")

    def test_unparsable_hop_fails_closed(self) -> None:
        gate = ClientGate(trusted_proxies=[ip_network("127.0.0.1"), ip_network("10.0.0.0/8")])
        shapes = [
            ["10.1.2.3:4444"],  # a port
            ["203.0.113.9:4444"],
            ["[2001:db8::1]:443"],
            ["unknown"],
            [""],  # the header present but empty
            ["   "],
            ["203.0.113.9, "],  # an empty nearest entry
            ["203.0.113.9", ""],  # an empty last header line
            ["garbage"],
            ["\xff\x00"],
            ["203.0.113.9 10.0.0.2"],
            ["_hidden"],  # RFC 7239 obfuscated identifier
            ["unknown, 10.0.0.2"],  # behind a trusted hop: the proxy would be the client
            ["[203.0.113.9"],
        ]
        for forwarded in shapes:
            with self.assertRaises(BadRequest, msg=forwarded):
                gate.client_address("127.0.0.1", forwarded)
        # Hops beyond the client (its own to write) are never read.
        self.assertEqual(gate.client_address("127.0.0.1", ["unknown, 203.0.113.9"]), "203.0.113.9")
        self.assertEqual(gate.client_address("127.0.0.1", ["1:2:3, 203.0.113.9"]), "203.0.113.9")
        # From an untrusted peer the header is not read at all.
        self.assertEqual(gate.client_address("198.51.100.1", ["unknown"]), "198.51.100.1")
