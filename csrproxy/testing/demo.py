"""``make demo``: the main job on loopback against a throwaway pebble.

Starts pebble (validating through our DNS port) and ``twistd -n csrproxy``
on free loopback ports, then acts as an installation: makes a fresh key and
CSR, POSTs it, checks the chain, prints what it got, and stops everything.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from csrproxy.client import ClientError, describe, obtain_certificate
from csrproxy.testing.daemon import start_csrproxy
from csrproxy.testing.pebble import start_pebble
from csrproxy.testing.ports import free_udp_tcp_port

ZONE = "go.example.test"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="csrproxy-demo-") as tmp:
        work = Path(tmp)
        dns_port = free_udp_tcp_port()
        print(f"starting pebble (dns-01 validation via 127.0.0.1:{dns_port}) ...", flush=True)
        with start_pebble(str(work / "pebble"), f"127.0.0.1:{dns_port}") as pebble:
            print(f"starting twistd -n csrproxy (zone {ZONE}) ...", flush=True)
            with start_csrproxy(str(work / "csrproxy"), pebble, dns_port, ZONE) as daemon:
                name = f"demo.{ZONE}"
                out = Path.cwd() / "demo-out"
                print(
                    f"client: new key and CSR for {name}, POST {daemon.url}/v1/sign ...", flush=True
                )
                try:
                    result = obtain_certificate(
                        daemon.url, out, [name], new_key=True, root_pem=pebble.root_pem()
                    )
                except ClientError as e:
                    print(
                        f"demo failed: {e}\n--- csrproxy log ---\n{daemon.log_tail()}",
                        file=sys.stderr,
                    )
                    return e.exit_code
                print(
                    "certificate issued; the leaf carries the key the client made, "
                    "and the chain leads to pebble's root."
                )
                print(describe(result))
    print("stopped pebble and csrproxy.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
