"""Lambda entry point of the API: ``hivemind_functions.api.handler.handler`` (API Gateway HTTP API v2).

The same app object uvicorn serves locally. Importing this module reads no environment and opens no
connection; services are built on the first request and reused while the execution environment lives.
"""

from __future__ import annotations

from mangum import Mangum

from hivemind_functions.api.app import create_app

app = create_app()
handler = Mangum(app, lifespan="off")
