"""The control-plane API (DESIGN §12): one FastAPI app, served by Mangum on Lambda and uvicorn locally.

``create_app(services)`` builds it; without ``services`` they are built from the ``HIVEMIND_*``
environment on the first request (so importing the Lambda handler reads nothing and stays cheap).
"""

from __future__ import annotations

import importlib
from typing import Any

from fastapi import APIRouter, FastAPI

from hivemind_functions import __version__
from hivemind_functions.api.deps import Services, ServicesHolder
from hivemind_functions.api.errors import ErrorBody, RequestGate, install_error_handlers

API_TITLE = "Hivemind rooms API"
OPENAPI_PATH = "/v1/openapi.json"

# Routers in the order their routes are documented. Each module exposes ``router: APIRouter``.
ROUTER_MODULES = ("system", "signup", "tenant", "rooms", "agents", "runs", "billing", "admin")

_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (400, "invalid input (invalid_input, invalid_json, ...)"),
        (401, "missing, malformed, unknown, revoked or expired credential"),
        (403, "the caller may not do this"),
        (404, "no such object (or not visible to the caller)"),
        (409, "conflict, or stored data failed verification (manifest_invalid, signature_invalid, ...)"),
        (410, "the object was deleted (room_deleted)"),
        (413, "payload_too_large"),
        (500, "internal_error"),
    )
}


def _load_router(name: str) -> APIRouter | None:
    module_name = f"hivemind_functions.api.routers.{name}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # Only a router module that does not exist is skipped; a broken import inside one is an error.
        if exc.name == module_name:
            return None
        raise
    router = module.router
    if not isinstance(router, APIRouter):
        raise TypeError(f"{module_name}.router is not an APIRouter")
    return router


def create_app(services: Services | None = None) -> FastAPI:
    app = FastAPI(
        title=API_TITLE,
        version=__version__,
        description=(
            "Control plane of Hivemind rooms. It never holds a key that opens room data: it stores "
            "ciphertext, public keys, hashes, signed envelopes and bookkeeping. See docs/api.md."
        ),
        openapi_url=OPENAPI_PATH,
        docs_url=None,
        redoc_url=None,
    )
    holder = ServicesHolder(services)
    app.state.services_holder = holder

    install_error_handlers(app)
    for name in ROUTER_MODULES:
        router = _load_router(name)
        if router is not None:
            app.include_router(router, responses=_ERROR_RESPONSES)

    app.add_middleware(RequestGate, services=holder.get)
    return app
