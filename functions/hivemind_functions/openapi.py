"""Write the API's OpenAPI document: ``python -m hivemind_functions.openapi [PATH]``.

``docs/openapi.json`` is generated with it and checked in; a test fails when it is out of date.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hivemind_functions.api.app import create_app

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "docs" / "openapi.json"


def openapi_document() -> dict[str, Any]:
    """The document the app serves at ``/v1/openapi.json`` (building it reads no settings)."""
    return create_app().openapi()


def render(document: dict[str, Any]) -> str:
    """Stable text: two-space indentation, ASCII only, one trailing newline."""
    return json.dumps(document, indent=2, ensure_ascii=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else DEFAULT_PATH
    path.write_text(render(openapi_document()), encoding="utf-8")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
