"""What the query API's OpenAPI 3.1 document (``GET /openapi.json``) is made from: the types the
API checks and answers with, so that no limit is written twice.

A :class:`Spec` gathers the component schemas that :func:`msgspec.json.schema_components`
makes of the answers' Structs, and writes the pieces of operations from types: the
parameters of a parameters Struct (each field one parameter, its type an alias of
:mod:`schemas` holding the limits that the parsers read too, and the parameter's
description), answers, and the one error body. Each router describes its own paths with
it (``openapi(spec)`` next to its ``ROUTES``); :func:`api.query.openapi_document` puts
them together.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

REF_TEMPLATE = "#/components/schemas/{name}"
# Every operation that takes an API key (all but /health, /ready and /metrics).
SECURITY: list[dict[str, list[str]]] = [{"apiKey": []}]
SECURITY_SCHEMES = {
    "apiKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "A `read` key of the tenant: `just create-key TENANT --scope read`.",
    }
}


class Error(Struct):
    """The body of every error the API answers."""

    error: Annotated[str, Meta(description="What went wrong, as a code such as `invalid_parameter`")]
    detail: Annotated[str, Meta(description="What is wrong and where, for people.")]


class Spec:
    """An OpenAPI document in the making: the component schemas its operations refer to."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}

    def schema(self, kind: Any) -> dict[str, Any]:
        """The schema of ``kind``: a ``$ref`` for a Struct, whose components are kept."""
        (schema,), components = msgspec.json.schema_components([kind], ref_template=REF_TEMPLATE)
        self.components |= components
        return schema

    def written_out(self, kind: type[Struct]) -> dict[str, Any]:
        """The schema of the Struct ``kind`` itself, not a ``$ref`` to it (the components it
        refers to are kept)."""
        (_,), components = msgspec.json.schema_components([kind], ref_template=REF_TEMPLATE)
        schema: dict[str, Any] = components.pop(kind.__name__)
        self.components |= components
        return schema

    def parameters(
        self, kind: type[Struct], where: Literal["query", "path"] = "query"
    ) -> list[dict[str, Any]]:
        """A parameter per field of ``kind``, in order: named as the field is encoded, required
        unless it has a default, described and limited by the field's type."""
        written = self.written_out(kind)
        required = set(written.get("required", ()))
        parameters: list[dict[str, Any]] = []
        for name, field in written["properties"].items():
            schema = dict(field)
            description = schema.pop("description", None)
            parameter: dict[str, Any] = {"name": name, "in": where, "required": name in required}
            if description is not None:
                parameter["description"] = description
            parameters.append(parameter | {"schema": schema})
        return parameters

    def page(self, kind: type[Struct], rows: list[type[Struct]]) -> dict[str, Any]:
        """The schema of ``kind``, a page of rows, written out with its list holding any of
        ``rows``: the Struct names one row type, whose subclasses (a dimension's rows) it holds too."""
        written = self.written_out(kind)
        for field in written["properties"].values():
            if field.get("type") == "array":
                field["items"] = {"anyOf": [self.schema(row) for row in rows]}
        return written

    def answer(self, description: str, schema: dict[str, Any]) -> dict[str, Any]:
        """A JSON response of ``schema``."""
        return {"description": description, "content": {"application/json": {"schema": schema}}}

    def error(self, description: str) -> dict[str, Any]:
        """An error response: ``{"error": code, "detail": what and where}``."""
        return self.answer(description, self.schema(Error))

    def document(self, title: str, paths: dict[str, Any]) -> dict[str, Any]:
        """The whole document: ``paths`` and the components they refer to."""
        return {
            "openapi": "3.1.0",
            "info": {"title": title, "version": "1"},
            "paths": paths,
            "components": {"securitySchemes": SECURITY_SCHEMES, "schemas": self.components},
        }
