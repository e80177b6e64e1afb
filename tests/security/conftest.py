"""Fixtures of the security suite.

The control-plane harness of ``tests/functions/conftest.py`` (the app on a fresh deployment, called
through Mangum and over HTTP, and ``hm``, which does what ``hmctl`` does on the client side with real
keys) is the tool most of these tests need. It lives in another directory's conftest, so it is loaded
here by path under its own module name and its fixtures are re-exported: the security tests then use
exactly the harness the control plane's own tests use, never a copy that could drift.

Also here:

- ``runner`` / ``pipeline``: the runner's real lifecycle with a simulated TEE and a fake pipeline
  (``tests/support/runner_harness.py``), for tampering with what a run reads and writes without
  containers;
- ``completed_run``: one finished run of a two-room deployment (output, an artifact, a receipt), the
  object every tamper case starts from.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def _load_functions_harness() -> ModuleType:
    name = "hivemind_security_functions_harness"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parent.parent / "functions" / "conftest.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before it runs: dataclasses look their module up in sys.modules.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


harness = _load_functions_harness()

# Re-exported fixtures (pytest registers fixture functions found in a conftest's namespace).
clock = harness.clock
store = harness.store
function_settings = harness.function_settings
services = harness.services
app = harness.app
lambda_api = harness.lambda_api
lambda_client_for = harness.lambda_client_for
_http_server = harness._http_server
http_api = harness.http_api
api = harness.api
hm = harness.hm
hm_lambda = harness.hm_lambda
