"""API routers, one module per area; each exposes ``router: APIRouter`` (see ``api.app.ROUTER_MODULES``)."""
