"""The OpenAPI document (`/openapi.json`, and with `serve --docs` Swagger UI at `/docs`): the
request models of `requests.py` and the reply models of `replies.py`, declared by reference, with every route's error
answers."""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from qwen2vl.server.protocols.openai_responses import ResponsesRequest
from qwen2vl.server.protocols import anthropic_messages
from qwen2vl.server.replies import RESPONSE_MODELS, ErrorResponse
from qwen2vl.server.requests import REQUEST_MODELS

_ERRORS = {400: "invalid request", 401: "missing or wrong API key", 404: "unknown model or path",
           408: "body not sent in time", 413: "body over the limit", 415: "body not sent as JSON",
           500: "a bug of the server", 503: "overloaded or shutting down", 504: "over the request timeout"}
SWAGGER_UI_PREFIX = "/static/swagger-ui"  # Swagger UI's files, package data of fastapi-offline
# Swagger UI is served from this origin like the chat page; only its styles need 'unsafe-inline'.
DOCS_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<link rel="icon" href="{prefix}/favicon.png"><link rel="stylesheet" href="{prefix}/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="{prefix}/swagger-ui-bundle.js"></script>
<script src="/static/docs.js"></script></body></html>
"""


def swagger_ui_files() -> Path:
    """The folder of Swagger UI's script and style sheet (package data of fastapi-offline)."""
    try:
        from importlib.resources import files

        folder = Path(str(files("fastapi_offline") / "static"))
    except ImportError:
        raise ImportError("--docs serves Swagger UI from the fastapi-offline package, which is not installed: "
                          "pip install 'qwen2vl[docs]' (or fastapi-offline)", name="fastapi_offline") from None
    return folder


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
        requests = (*REQUEST_MODELS, ResponsesRequest, *anthropic_messages.REQUEST_MODELS)
        models = [(model, "validation") for model in requests] + [(model, "serialization") for model in RESPONSE_MODELS]
        _, definitions = models_json_schema(models, ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {})
        components.setdefault("schemas", {}).update(definitions["$defs"])
        if with_api_key:
            components["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"apiKey": []}]
        app.openapi_schema = schema
    return app.openapi_schema


def docs_page(app: FastAPI) -> HTMLResponse:
    """Swagger UI (`serve --docs`), every file of it from this server: no third-party script runs
    in the origin where the chat page keeps the API key."""
    page = _DOCS_PAGE.format(title=f"{app.title} - API", prefix=SWAGGER_UI_PREFIX)
    return HTMLResponse(page, headers={"content-security-policy": DOCS_POLICY})
