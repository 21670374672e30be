"""The OpenAPI document (csrproxy/web/openapi.json) against the code it describes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate
from twisted.trial.unittest import SynchronousTestCase

import csrproxy.admin
from csrproxy.errors import (
    PROBLEM_NAMESPACE,
    BadCSR,
    CAUnavailable,
    ConfigError,
    CsrproxyError,
    IssuanceFailed,
    ListenError,
)
from csrproxy.issuance.orders import OrderRecord
from csrproxy.issuance.recovery import order_record
from csrproxy.state.rows import OrderRow
from csrproxy.state.store import StoreUnavailable
from csrproxy.web.api import SigningAPI
from csrproxy.web.openapi import openapi_bytes, openapi_document
from csrproxy.web.problems import problem_document
from tests.web.test_api import APITestCase

README = Path(__file__).resolve().parents[2] / "README.md"

#: Raised before the API listens, or by csrproxy-admin (and their subclasses, such as
#: StateInUse): never an answer of the API.
NOT_ANSWER_ROOTS = (ConfigError, ListenError, csrproxy.admin.NotAStateDatabase)

#: Problems whose status is chosen per instance (csrproxy.issuance.results.translate: the
#: CA's rateLimited, its refusals, an unreachable CA; CAUnavailable: the breaker is open).
STATUSES = {IssuanceFailed: {429, 502, 503}, CAUnavailable: {503}}

#: What the listener answers by itself (csrproxy.web.limits), before any route.
LISTENER_PROBLEMS = {("bad-request", 400), ("request-timeout", 408), ("body-too-large", 413)}


def subclasses(cls: type[CsrproxyError]) -> set[type[CsrproxyError]]:
    out: set[type[CsrproxyError]] = set()
    for sub in cls.__subclasses__():
        out |= {sub} | subclasses(sub)
    return out


def served_operations() -> set[tuple[str, str]]:
    """(path as OpenAPI writes it, method) for every rule Klein routes."""
    ops = set()
    for rule in SigningAPI.app.url_map.iter_rules():
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        # werkzeug adds HEAD to every GET rule; the document does not list it.
        ops |= {(path, m.lower()) for m in rule.methods or () if m not in {"HEAD", "OPTIONS"}}
    return ops


def documented_problems(doc: dict[str, Any]) -> set[tuple[str, int]]:
    """(type, status) of every problem response the document declares."""
    out = set()
    for name, response in doc["components"]["responses"].items():
        if not name.startswith("Problem"):
            continue
        schema = response["content"]["application/problem+json"]["schema"]
        narrowed = schema["allOf"][1]["properties"]
        status = narrowed["status"]["const"]
        out |= {(t.removeprefix(PROBLEM_NAMESPACE), status) for t in narrowed["type"]["enum"]}
    return out


class DocumentTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.doc = openapi_document()

    def test_valid_openapi_3_1(self) -> None:
        self.assertEqual(self.doc["openapi"], "3.1.0")
        validate(self.doc)  # raises OpenAPISpecValidatorError

    def test_paths_are_the_routes(self) -> None:
        documented = {
            (path, method)
            for path, item in self.doc["paths"].items()
            for method in item
            if method in {"get", "put", "post", "delete", "patch", "options", "head", "trace"}
        }
        self.assertEqual(documented, served_operations())

    def test_every_problem_type_with_its_status(self) -> None:
        documented = documented_problems(self.doc)
        raised = set()
        not_answers = {c for r in NOT_ANSWER_ROOTS for c in {r} | subclasses(r)}
        for cls in subclasses(CsrproxyError) - not_answers:
            for status in STATUSES.get(cls, {cls.status}):
                raised.add((cls.problem, status))
        raised |= LISTENER_PROBLEMS | {(CsrproxyError.problem, CsrproxyError.status)}
        # The store's error is defined outside csrproxy.errors, and is seen all the same.
        self.assertIn((StoreUnavailable.problem, StoreUnavailable.status), raised)
        self.assertEqual(raised - documented, set())
        # Nothing documented that nothing raises.
        self.assertEqual(documented - raised, set())

    def test_readme_table_is_in_the_document(self) -> None:
        rows = re.findall(r"^\| (\d{3}) \| `([a-z-]+)` \|", README.read_text(), re.M)
        self.assertGreater(len(rows), 15)
        self.assertEqual({(t, int(s)) for s, t in rows} - documented_problems(self.doc), set())

    def test_every_problem_response_is_a_problem(self) -> None:
        for path, item in self.doc["paths"].items():
            for method, op in item.items():
                for status, response in op["responses"].items():
                    # Readiness answers 503 with its own document, each check reported.
                    health = path.startswith("/v1/health") and status == "503"
                    if int(status) >= 400 and "$ref" not in response and not health:
                        content = response["content"]
                        self.assertIn("application/problem+json", content, (path, method))

    def test_async_answer_links_to_its_order(self) -> None:
        accepted = self.doc["components"]["responses"]["Accepted"]
        self.assertIn("Location", accepted["headers"])
        op_ids = {
            op["operationId"] for item in self.doc["paths"].values() for op in item.values()
        }
        for link in accepted["links"].values():
            self.assertIn(link["operationId"], op_ids)
            self.assertIn("$response.header.Location", link["parameters"]["order_id"])


def schema_check(doc: dict[str, Any], name: str, instance: Any) -> list[str]:
    """What is wrong with ``instance`` as the document's schema ``name`` (nothing: [])."""
    schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    return [e.message for e in OAS31Validator(schema).iter_errors(instance)]


class AnswerSchemaTests(SynchronousTestCase):
    """Answers the fuzzer seldom or never sees, against the document's schemas."""

    def setUp(self) -> None:
        self.doc = openapi_document()

    def test_orders_in_memory(self) -> None:
        failed = problem_document(BadCSR("no", ["x.example.com"]))
        for record in [
            OrderRecord("0" * 32, ("x.example.com",)),
            OrderRecord("0" * 32, ("x.example.com",), "valid", "-----BEGIN CERTIFICATE-----"),
            OrderRecord("0" * 32, ("x.example.com",), "invalid", None, failed),
            OrderRecord("0" * 32, ("x.example.com",), "invalid", None, problem_document(OSError())),
        ]:
            self.assertEqual(schema_check(self.doc, "Order", record.document()), [], record)

    def test_orders_of_an_earlier_run(self) -> None:
        # Their problem is not kept, only its detail: the error is an about:blank problem.
        for status, error in [("processing", None), ("issued", None), ("invalid", "refused")]:
            row = OrderRow("0" * 32, "k", b"", ["x.example.com"], status, error=error)
            record = order_record((row, None))
            assert record is not None
            self.assertEqual(schema_check(self.doc, "Order", record.document()), [], status)

    def test_problem_documents(self) -> None:
        for e in [BadCSR("no", ["x"]), CAUnavailable("down", 9.5), Exception()]:
            self.assertEqual(schema_check(self.doc, "Problem", problem_document(e)), [], e)


class ServedTests(APITestCase):
    def test_served_as_stored(self) -> None:
        code, headers, body = self.request("GET", "/v1/openapi.json")
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders("content-type"), ["application/json"])
        self.assertEqual(body, openapi_bytes())
        self.assertEqual(json.loads(body), openapi_document())
        self.assertEqual(self.metrics.http_counts["/v1/openapi.json", 200], 1)
