"""The control-plane HTTP API: FastAPI app, dependencies, error mapping and routers."""
