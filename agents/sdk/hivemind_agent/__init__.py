"""Hivemind agent SDK: the contract between a room agent and the runner's bridge (docs/agents.md).

Standard library only; it ships inside agent containers. A complete agent::

    from hivemind_agent import Context, main

    def answer(ctx: Context) -> str:
        result = ctx.sql("SELECT region, COUNT(*) AS n FROM orders GROUP BY region")
        return "\\n".join(f"{region}: {n}" for region, n in result.rows)

    if __name__ == "__main__":
        main(answer)
"""

from .client import ENV_BRIDGE, ENV_ROLE, ENV_SESSION, Bridge, Llm
from .errors import (
    BridgeError,
    BridgeUnavailable,
    BudgetExhausted,
    Denied,
    InvalidRequest,
    NotAllowedForRole,
    NotFound,
    ProtocolError,
)
from .models import (
    ROLES,
    AgentInput,
    AggregateRule,
    ArtifactRef,
    Budgets,
    ChatCompletion,
    Column,
    Item,
    ItemInfo,
    PolicyCheck,
    PolicyProblem,
    Schema,
    SimulationResult,
    SqlResult,
    Table,
    Usage,
    Widening,
)
from .runtime import Context, main, run

__version__ = "0.1.0"

__all__ = [
    "ENV_BRIDGE",
    "ENV_ROLE",
    "ENV_SESSION",
    "ROLES",
    "AgentInput",
    "AggregateRule",
    "ArtifactRef",
    "Bridge",
    "BridgeError",
    "BridgeUnavailable",
    "BudgetExhausted",
    "Budgets",
    "ChatCompletion",
    "Column",
    "Context",
    "Denied",
    "InvalidRequest",
    "Item",
    "ItemInfo",
    "Llm",
    "NotAllowedForRole",
    "NotFound",
    "PolicyCheck",
    "PolicyProblem",
    "ProtocolError",
    "Schema",
    "SimulationResult",
    "SqlResult",
    "Table",
    "Usage",
    "Widening",
    "__version__",
    "main",
    "run",
]
