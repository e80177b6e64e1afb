"""Control-plane logic behind the routers: plain functions over a :class:`hivemind.store.Store`.

Routers parse requests and shape responses; these modules decide and write (validate first, write
last). They are importable without FastAPI, e.g. by the local stack's bootstrap.
"""
