"""The running API against its OpenAPI document, fuzzed by Schemathesis.

A real ``twistd csrproxy`` (this checkout's code) with pebble: every operation gets
generated bodies, headers, query and path parameters, then a stateful run follows the
202's ``Location`` link to the order and its certificate. Every answer must be a non-5xx
the document declares (status, content type, headers, schema), and the daemon must still
sign a real CSR afterwards.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pytest
import requests
import schemathesis
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, Phase, settings
from hypothesis.errors import Flaky, InvalidDefinition
from hypothesis.stateful import run_state_machine_as_test
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from csrproxy.testing.daemon import Csrproxy, start_csrproxy
from csrproxy.testing.pebble import Pebble
from csrproxy.web.auth import token_hash
from csrproxy.web.openapi import openapi_document
from tests.conftest import ZONE
from tests.support.api import post_sign
from tests.support.keys import make_csr

pytestmark = pytest.mark.integration

ROOT = str(Path(__file__).resolve().parents[2])
ENV = {"PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}

#: Budgets off: the fuzzer's requests would otherwise spend them and meet 429s (which the
#: document declares, but which would hide what lies behind them).
NO_BUDGETS = {
    "new_names_per_week": 0,
    "orders_per_3h": 0,
    "same_names_per_week": 0,
    "client_requests_per_hour": 0,
}

#: Generated requests per operation (the coverage phase adds its boundary cases): 25 keeps
#: the module near 15 s; CSRPROXY_FUZZ_EXAMPLES=400 is a longer hunt (about a minute).
EXAMPLES = int(os.environ.get("CSRPROXY_FUZZ_EXAMPLES", "25"))
STATEFUL_EXAMPLES = 20  # scenarios a run, of up to 8 steps
STATEFUL_RUNS = 10
STATEFUL_SECONDS = 30.0
#: Each request answers at once (real CSRs go with Prefer: respond-async): one slower than
#: this is a failure, as a request the HTTP client gives up on is.
DEADLINE = timedelta(seconds=5)
TIMEOUT = 10

#: A body the schema allows (any string, any bytes) is not therefore a CSR that verifies:
#: "positive data" is answered 400 bad-csr, as documented.
EXCLUDED = [positive_data_acceptance]


TOKEN = "fuzz-token"


@dataclass
class Target:
    """A daemon under fuzzing, and the headers requests to it carry (its token)."""

    daemon: Csrproxy
    headers: dict[str, str]

    @property
    def url(self) -> str:
        return self.daemon.url


@pytest.fixture(scope="module", params=["open", "tokens"])
def fuzzed(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    pebble: Pebble,
    dns_port: int,
) -> Iterator[Target]:
    """The API without tokens (allow_from only), then with a tokens file (the token sent)."""
    work = tmp_path_factory.mktemp(f"openapi-fuzz-{request.param}")
    overrides: dict[str, dict[str, Any]] = {
        "acme": {"poll_interval": 0.005, "poll_max": 0.5},
        "policy": {"names": [f"{{label}}.{ZONE}"], **NO_BUDGETS},
    }
    headers = {}
    if request.param == "tokens":
        tokens = work / "tokens"
        tokens.write_text(f"{token_hash(TOKEN)}\n")
        overrides["api"] = {"tokens_file": str(tokens)}
        headers = {"Authorization": f"Bearer {TOKEN}"}
    with start_csrproxy(str(work), pebble, dns_port, ZONE, overrides=overrides, env=ENV) as d:
        yield Target(d, headers)


def real_csrs(count: int) -> list[bytes]:
    """PEM CSRs the daemon will sign: fresh names, so the first sign of each is an order."""
    stamp = int(time.time() * 1000)
    return [make_csr([f"fuzz{stamp}x{i}.{ZONE}"]) for i in range(count)]


#: The real CSRs sign requests carry; each test makes its own (a CSR signed before is
#: answered from the cache: 200, no order).
PEMS = real_csrs(6)


def with_real_csrs(schema: Any) -> Any:
    """``schema``, with real CSRs (of :data:`PEMS`) mixed into the sign requests that fit it."""

    # The generated bodies are never CSRs that verify: now and then a request that fits the
    # document carries a real one, with Prefer: respond-async, so that orders exist and the
    # 202's links are followed.
    @schema.hook.apply_to(operation_id="sign")  # type: ignore[untyped-decorator]
    def flatmap_case(ctx: Any, case: Any) -> Any:
        if case.meta is None or case.meta.generation.mode != GenerationMode.POSITIVE:
            return st.just(case)

        def real(pem: bytes) -> Any:
            if isinstance(case.body, dict):
                case.body = {"csr": pem.decode()}
            elif isinstance(case.body, str):
                case.body = pem.decode()
            else:
                case.body = x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER)
            case.headers = {**(case.headers or {}), "Prefer": "respond-async"}
            case.query = {}
            return case

        chosen = st.integers(0, len(PEMS) - 1).map(lambda i: PEMS[i])
        return st.one_of(st.just(case), chosen.map(real))

    return schema


def test_document_served_is_the_file(fuzzed: Target) -> None:
    got = requests.get(fuzzed.url + "/v1/openapi.json", timeout=10)
    assert got.status_code == 200
    assert got.headers["Content-Type"] == "application/json"
    assert got.json() == openapi_document()


# The CSR's body forms as they go on the wire: DER as the bytes generated, PEM as text.
schemathesis.serializer.alias("application/pkcs10", "application/octet-stream")
schemathesis.serializer.alias("application/x-pem-file", "text/plain")

#: The document as stored (test_document_served_is_the_file: and as served). Loaded at
#: import, as schemathesis.pytest wants (its from_fixture fails on pytest 9: no _nodeid).
SCHEMA = with_real_csrs(schemathesis.openapi.from_dict(openapi_document()))
# Requests that fit the document and requests that do not (the coverage phase adds both
# kinds at the schemas' boundaries, and methods the routes do not take).
SCHEMA.config.generation.update(modes=list(GenerationMode), max_examples=EXAMPLES)

#: (operation, status) -> answers seen, for the summary.
SEEN: Counter[str] = Counter()


@SCHEMA.parametrize()  # type: ignore[untyped-decorator]
@settings(deadline=DEADLINE, suppress_health_check=list(HealthCheck), database=None)
def test_every_operation(case: Any, fuzzed: Target) -> None:
    # Requests that do not fit the document go without the token (a tokens file's daemon
    # answers them 401, before it reads anything else): what an unknown client meets.
    positive = case.meta is None or case.meta.generation.mode == GenerationMode.POSITIVE
    response = case.call_and_validate(
        base_url=fuzzed.url,
        headers=fuzzed.headers if positive else None,
        excluded_checks=EXCLUDED,
        timeout=TIMEOUT,
    )
    SEEN[f"{case.operation.label} {response.status_code}"] += 1


def test_every_operation_was_fuzzed() -> None:
    if not SEEN:
        pytest.skip("runs after test_every_operation")
    for key, count in sorted(SEEN.items()):
        print(f"  {count:4d}  {key}")
    print(f"  {SEEN.total():4d}  requests")
    assert {k.rsplit(" ", 1)[0] for k in SEEN} == {
        f"{method.upper()} {path}"
        for path, item in openapi_document()["paths"].items()
        for method in item
    }
    assert SEEN["POST /v1/sign 202"] > 0


def test_stateful_links(fuzzed: Target) -> None:
    session = requests.Session()
    seen: Counter[str] = Counter()

    class Machine(SCHEMA.as_state_machine()):  # type: ignore[misc]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {
                "base_url": fuzzed.url,
                "session": session,
                "headers": fuzzed.headers,
                "timeout": TIMEOUT,
            }

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            seen[f"{case.operation.label} {response.status_code}"] += 1
            case.validate_response(response, excluded_checks=EXCLUDED)

    # The daemon's answers depend on what came before (a CSR signed once is a cached 200
    # next time, an order is 409 until the CA is done), so Hypothesis may find a choice it
    # replays leading elsewhere (Flaky): as schemathesis' own runner does, start again, up
    # to STATEFUL_RUNS runs in STATEFUL_SECONDS.
    started = time.monotonic()
    runs = 0
    restarts: Counter[str] = Counter()
    while runs < STATEFUL_RUNS and time.monotonic() - started < STATEFUL_SECONDS:
        runs += 1
        PEMS[:] = real_csrs(len(PEMS))  # new orders for this run's links to follow
        try:
            run_state_machine_as_test(
                Machine,
                settings=settings(
                    max_examples=STATEFUL_EXAMPLES,
                    stateful_step_count=8,
                    phases=[Phase.generate],  # no replays, no shrinking (as schemathesis')
                    deadline=DEADLINE,
                    suppress_health_check=list(HealthCheck),
                    database=None,
                ),
            )
        except Flaky as e:
            restarts[type(e).__name__] += 1
        except InvalidDefinition as e:
            # Schemathesis' budget of calls per link can leave no rule enabled (its own
            # runner sees no such dead end: it draws the rules itself).
            if "No progress can be made" not in str(e):
                raise
            restarts["no progress"] += 1
    took = time.monotonic() - started
    print(f"stateful: {runs} runs in {took:.1f} s, restarted: {dict(restarts) or 'none'}")
    for key, count in sorted(seen.items()):
        print(f"  {count:4d}  {key}")
    # Generated ids are unknown (404): a 200 is an id taken from a 202's Location, or from
    # a chain's CSRProxy-Certificate-Id.
    assert seen["GET /v1/orders/{order_id} 200"] > 0
    assert seen["GET /v1/certificates/{certificate_id} 200"] > 0


def test_still_signs_afterwards(fuzzed: Target) -> None:
    code, body = post_sign(fuzzed.daemon, real_csrs(1)[0], fuzzed.headers)
    assert code == 200, body
    assert body.startswith(b"-----BEGIN CERTIFICATE-----")
