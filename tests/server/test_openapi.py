# -*- test-case-name: tests.server.test_openapi -*-
"""GET /openapi.json, and the checks that keep the document and the code
from drifting apart: the same routes, the same methods, the same error codes,
the same public endpoints, and a document that is valid OpenAPI 3.1."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from openapi_spec_validator import validate

from securevault import __version__
from securevault.server.openapi import ERROR_STATUS, build_document
from securevault.server.web import CollectionResource, build_root
from tests.support.app import VaultClient, add_user, make_app
from tests.support.testcase import SyncTestCase

PACKAGE = Path(__file__).resolve().parents[2] / "securevault"
# ApiError(status, "code", ...): every error the code raises or answers.
API_ERROR = re.compile(r'(?:ApiError|tus_error)\(\s*(\d{3}),\s*"([a-z_]+)"')
# {"error": "code", ...}: the bodies written without an ApiError (the 500s).
ERROR_LITERAL = re.compile(r'"error":\s*"([a-z_]+)"')
METHODS = {"get", "head", "post", "put", "patch", "delete", "options", "trace"}


def codes_in_source() -> dict[str, set[int]]:
    """Every error code the package's source constructs, with its statuses
    (an empty set for the bodies whose status is set elsewhere)."""
    found: dict[str, set[int]] = {}
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for status, code in API_ERROR.findall(text):
            found.setdefault(code, set()).add(int(status))
        for code in ERROR_LITERAL.findall(text):
            found.setdefault(code, set())
    return found


def document_error_codes(document: dict[str, Any]) -> dict[str, set[int]]:
    """Every code an operation's error answers name, with the statuses they
    are listed under."""
    found: dict[str, set[int]] = {}
    for methods in document["paths"].values():
        for operation in methods.values():
            for status, response in operation["responses"].items():
                for media in response.get("content", {}).values():
                    for part in media["schema"].get("allOf", []):
                        for code in part.get("properties", {}).get("error", {}).get("enum", []):
                            found.setdefault(code, set()).add(int(status))
    return found


class OpenApiDocumentTests(SyncTestCase):
    """The document against the code."""

    def setUp(self) -> None:
        self.app, self.clock = make_app(self)
        self.document = build_document(__version__)

    def test_valid_openapi(self) -> None:
        """The document is valid OpenAPI 3.1 (openapi-spec-validator)."""
        self.assertEqual(self.document["openapi"], "3.1.0")
        validate(self.document)

    def test_routes_and_methods(self) -> None:
        """Every route of build_root and every method its resource allows
        is in the document, and nothing else is."""
        root = build_root(self.app)
        served: dict[str, set[str]] = {}
        for name, child in root.children.items():
            path = "/" + name.decode("ascii")
            if isinstance(child, CollectionResource):  # /uploads/ and its items /uploads/{id}
                served[path + "/"] = {m.decode("ascii").lower() for m in child.collection.allowedMethods}
                served[path + "/{id}"] = {m.decode("ascii").lower() for m in child.item.allowedMethods}
            else:
                served[path] = {method.decode("ascii").lower() for method in child.allowedMethods}
        documented = {path: set(methods) & METHODS for path, methods in self.document["paths"].items()}
        self.assertEqual(documented, served)

    def test_error_codes(self) -> None:
        """The error schema's enum is exactly the set of codes the source
        constructs, each with the status the source gives it."""
        source = codes_in_source()
        self.assertEqual(
            set(self.document["components"]["schemas"]["Error"]["properties"]["error"]["enum"]), set(source)
        )
        self.assertEqual(set(ERROR_STATUS), set(source))
        for code, statuses in source.items():
            self.assertLessEqual(statuses, {ERROR_STATUS[code]}, code)

    def test_operations_list_codes_under_their_status(self) -> None:
        """Each operation's error answers name codes under their own status,
        and every code but method_not_allowed (which belongs to the methods
        a path does not list) is some operation's answer."""
        documented = document_error_codes(self.document)
        for code, statuses in documented.items():
            self.assertEqual(statuses, {ERROR_STATUS[code]}, code)
        self.assertEqual(set(documented), set(ERROR_STATUS) - {"method_not_allowed"})


class OpenApiResourceTests(SyncTestCase):
    """GET /openapi.json through the pipeline."""

    def setUp(self) -> None:
        self.app, self.clock = make_app(self)
        self.client = VaultClient(self.app, self.clock, self)

    def test_served_without_session(self) -> None:
        """GET /openapi.json answers the document as JSON, without a session."""
        response = self.client.get(b"/openapi.json")
        self.assertEqual(response.status, 200, response.body)
        self.assertEqual(response.header("Content-Type"), "application/json; charset=utf-8")
        self.assertEqual(response.json(), json.loads(json.dumps(build_document(__version__))))
        self.assertEqual(response.json()["info"]["version"], __version__)

    def test_public_operations(self) -> None:
        """Exactly the operations the document marks public (security
        without a bearer) answer something other than 401 without a session."""
        add_user(self.app, "alice", "alice correct horse")
        document = build_document(__version__)
        for path, methods in document["paths"].items():
            for method, operation in methods.items():
                public = all("bearer" not in scheme for scheme in operation.get("security", document["security"]))
                # A well-formed tus request: tus checks its headers first.
                headers = [
                    (b"Tus-Resumable", b"1.0.0"),
                    (b"Upload-Length", b"1"),
                    (b"Upload-Metadata", b"filename YS5iaW4="),
                    (b"Upload-Offset", b"0"),
                ]
                if method == "post":
                    headers.append((b"Content-Type", b"application/json"))
                if method == "patch":
                    headers.append((b"Content-Type", b"application/offset+octet-stream"))
                response = self.client.request(
                    method.upper().encode("ascii"),
                    path.replace("{id}", "0" * 32).encode("ascii"),
                    body=b"{}" if method == "post" else None,
                    headers=headers,
                )
                self.assertEqual(response.status != 401, public, f"{method} {path}: {response.status}")
