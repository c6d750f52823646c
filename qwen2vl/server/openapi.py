"""The OpenAPI document (`/openapi.json`, and with `serve --docs` Swagger UI at `/docs`): the
request and response models of `schemas.py`, declared by reference, with every route's error
answers."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from qwen2vl.server.schemas import REQUEST_MODELS, RESPONSE_MODELS, ErrorResponse

_ERRORS = {400: "invalid request", 401: "missing or wrong API key", 404: "unknown model or path",
           408: "body not sent in time", 413: "body over the limit", 415: "body not sent as JSON",
           500: "a bug of the server", 503: "overloaded or shutting down", 504: "over the request timeout"}
SWAGGER_UI_ORIGIN = "https://cdn.jsdelivr.net"  # where FastAPI's Swagger UI page loads its script and style from
# FastAPI's page: Swagger UI from its CDN, started by an inline script; its favicon from FastAPI's site
DOCS_POLICY = (f"default-src 'none'; script-src {SWAGGER_UI_ORIGIN} 'unsafe-inline'; style-src {SWAGGER_UI_ORIGIN}; "
               "img-src 'self' data: https://fastapi.tiangolo.com; connect-src 'self'; base-uri 'none'; "
               "frame-ancestors 'none'")


def _ref(model: type[BaseModel]) -> dict:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def request_body(model: type[BaseModel]) -> dict:
    """A route's `openapi_extra` declaring `model` as its JSON body (the handlers parse it themselves)."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": _ref(model)}}}}


def responses(model: type[BaseModel], chunk: type[BaseModel] | None = None) -> dict:
    """A route's `responses`: `model` (or with `stream: true`, events of `chunk`), and the errors."""
    content = {"application/json": {"schema": _ref(model)}}
    description = "OK"
    if chunk is not None:
        content["text/event-stream"] = {"schema": _ref(chunk)}
        description = "the response, or with `stream: true` server-sent events, each `data: <chunk>`, then `data: [DONE]`"
    errors = {status: {"description": text, "content": {"application/json": {"schema": _ref(ErrorResponse)}}}
              for status, text in _ERRORS.items()}
    return {200: {"description": description, "content": content}, **errors}


def openapi_document(app: FastAPI, with_api_key: bool) -> dict:
    """The app's document, built once, with the models' schemas as components."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        models = [(model, "validation") for model in REQUEST_MODELS] + [(model, "serialization") for model in RESPONSE_MODELS]
        _, definitions = models_json_schema(models, ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {})
        components.setdefault("schemas", {}).update(definitions["$defs"])
        if with_api_key:
            components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"apiKey": []}]
        app.openapi_schema = schema
    return app.openapi_schema


def docs_page(app: FastAPI) -> HTMLResponse:
    """Swagger UI (`serve --docs`): a third-party script in the origin where the chat page keeps the
    API key, hence off by default; its Content-Security-Policy allows that script's origin only here."""
    page = get_swagger_ui_html(openapi_url=app.openapi_url, title=f"{app.title} - API")
    page.headers["content-security-policy"] = DOCS_POLICY
    return page
