"""The twistd drop-in: ``twistd csrproxy``."""

from twisted.application.service import ServiceMaker

csrproxy = ServiceMaker(
    "csrproxy",
    "csrproxy.tap",
    "Sign CSRs with a public ACME CA, answering dns-01 from our own DNS server",
    "csrproxy",
)
