"""Limits of the scoped-data engine: what loading may read and hold, and what one query may cost."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from hivemind.models import StrictModel

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


class ScopedLimits(StrictModel):
    """Every bound the loader and the SQL gate enforce. Exceeding a load limit fails the load with
    :class:`~hivemind_runner.scoped.errors.DataLimitExceeded`; a query limit refuses or truncates
    that query only."""

    # --- loading ---
    max_item_bytes: int = Field(default=2 * GiB, ge=1, description="plaintext bytes read from one item")
    max_total_bytes: int = Field(default=8 * GiB, ge=1, description="plaintext bytes read from all items")
    max_item_rows: int = Field(default=50_000_000, ge=1, description="source rows read from one item")
    max_database_bytes: int = Field(
        default=512 * MiB, ge=64 * KiB, description="size of the final in-memory database"
    )
    max_file_database_bytes: int = Field(
        default=8 * GiB,
        ge=64 * KiB,
        description="size of a database kept in a workspace file (the full read, when a workspace is set)",
    )
    max_columns: int = Field(default=1024, ge=1, le=2000, description="columns of one source table")
    max_line_bytes: int = Field(
        default=1 * MiB, ge=1 * KiB, description="one physical CSV line or one JSON line, in bytes"
    )
    batch_rows: int = Field(default=5000, ge=1, le=1_000_000, description="rows staged per batch")
    workspace: Path | None = Field(
        default=None,
        description="directory (tmpfs) for SQLite item files while they are read and for the full-read "
        "database; None: SQLite items in TMPDIR, the full read in memory",
    )

    # --- queries ---
    max_sql_chars: int = Field(default=64 * KiB, ge=64, description="length of one submitted query")
    max_result_rows: int = Field(
        default=10_000, ge=0, description="row cap of every result (the policy's max_rows may be lower)"
    )
    max_result_bytes: int = Field(
        default=4 * MiB,
        ge=1 * KiB,
        description="JSON size of one result; also the largest value SQL may build",
    )
    query_timeout_ms: int = Field(default=5_000, ge=1, description="wall-clock budget of one query")
    query_max_steps: int = Field(
        default=200_000_000, ge=1_000, description="SQLite virtual machine steps one query may take"
    )

    # --- documents ---
    max_document_bytes: int = Field(
        default=8 * MiB, ge=1, description="largest document item served through the items tool"
    )
