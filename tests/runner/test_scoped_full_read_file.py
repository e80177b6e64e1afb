"""The scope stage's full read in a workspace file: same answers, gone on close, bounded runner memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hivemind.models import Stage
from hivemind_runner.scoped import (
    DataLimitExceeded,
    DataLoadError,
    ItemInfo,
    RoomItem,
    ScopedLimits,
    full_read_database,
)
from hivemind_runner.scoped.sources import csv_value

MiB = 1024 * 1024
PEOPLE = b"name,department,salary\nAda,eng,100\nBob,eng,90\nCyd,ops,80\n"


def people(data: bytes = PEOPLE) -> RoomItem:
    info = ItemInfo(id="item_people", name="people.csv", content_type="text/csv", size=len(data))
    return RoomItem.from_bytes(info, data)


def database_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("hivemind-db-*"))


def test_with_a_workspace_the_full_read_is_a_file_there_until_it_closes(tmp_path: Path) -> None:
    with full_read_database([people()], ScopedLimits(workspace=tmp_path)) as database:
        [file] = database_files(tmp_path)
        assert file.stat().st_mode & 0o777 == 0o600
        rows = database.query("SELECT department, SUM(salary) FROM people GROUP BY 1", role=Stage.SCOPE)
        assert rows.rows == [["eng", 190], ["ops", 80]]
        assert database.schema(role=Stage.SCOPE).tables[0].row_count == 3
    assert database_files(tmp_path) == []


def test_the_file_and_memory_full_reads_hold_the_same_database(tmp_path: Path) -> None:
    with (
        full_read_database([people()], ScopedLimits(workspace=tmp_path)) as in_file,
        full_read_database([people()]) as in_memory,
    ):
        query = "SELECT name, department, salary, typeof(salary) FROM people ORDER BY name"
        assert in_file.query(query, role=Stage.SCOPE) == in_memory.query(query, role=Stage.SCOPE)
        assert in_file.schema(role=Stage.SCOPE) == in_memory.schema(role=Stage.SCOPE)


def test_a_failed_load_leaves_no_file_behind(tmp_path: Path) -> None:
    with pytest.raises(DataLoadError, match="bad_csv"):
        full_read_database([people(PEOPLE + b"Dee,ops\n")], ScopedLimits(workspace=tmp_path))
    assert database_files(tmp_path) == []


def test_the_file_database_has_its_own_size_limit(tmp_path: Path) -> None:
    rows = b"".join(f"Person {i},dept{i % 7},{i}\n".encode() for i in range(20_000))
    limits = ScopedLimits(workspace=tmp_path, max_file_database_bytes=64 * 1024, max_database_bytes=1 * 2**30)
    with pytest.raises(DataLimitExceeded, match="database_bytes"):
        full_read_database([people(b"name,department,salary\n" + rows)], limits)
    assert database_files(tmp_path) == []


@pytest.mark.parametrize(
    ("cell", "value"),
    [
        ("", None),
        ("Ada", "Ada"),
        ("-", "-"),
        ("-12", -12),
        ("0", 0),
        ("007", "007"),
        ("1.5", 1.5),
        ("-2.5e3", -2500.0),
        ("9" * 20, "9" * 20),
        (" 3", " 3"),
        ("+5", "+5"),
        ("NaN", "NaN"),
        ("1,5", "1,5"),
    ],
)
def test_csv_values_keep_their_typing_rules(cell: str, value: object) -> None:
    assert csv_value(cell) == value
    assert type(csv_value(cell)) is type(value)


def write_people_csv(path: Path, size: int = 200 * MiB) -> None:
    with path.open("w") as out:
        out.write("id,name,email,department,salary,region,notes\n")
        index = 0
        while out.tell() < size:
            out.write(
                "".join(
                    f"{i},Person {i},p{i}@example.com,dept{i % 20},{30_000 + (i * 7919) % 150_000},"
                    f"{'eu' if i % 10 == 0 else 'us'},{'x' * 90}\n"
                    for i in range(index, index + 10_000)
                )
            )
            index += 10_000


MEASURE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from hivemind.models import Stage
    from hivemind_runner.scoped import ItemInfo, RoomItem, ScopedLimits, full_read_database

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        raise LookupError(field)

    path, workspace = Path(sys.argv[1]), Path(sys.argv[2])
    item = RoomItem.from_path(
        ItemInfo(id="item_big", name="people.csv", content_type="text/csv", size=path.stat().st_size), path
    )
    try:  # reset the peak to the current RSS so imports do not count
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    baseline = status("VmHWM")
    with full_read_database([item], ScopedLimits(workspace=workspace)) as database:
        rows = database.query("SELECT COUNT(*) FROM people", role=Stage.SCOPE).rows
        size = sum(file.stat().st_size for file in workspace.iterdir())
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "rows": rows, "size": size}))
    """
)


@pytest.mark.slow
def test_a_200_mb_full_read_in_a_workspace_file_keeps_the_runner_memory_bounded(tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    write_people_csv(path)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    completed = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path), str(workspace)],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    )
    measured = json.loads(completed.stdout)
    assert measured["rows"][0][0] > 1_000_000
    # Every row went into the database (about as big as the CSV), yet the process grew only by its
    # page cache (16 MiB) and a batch: the data is in the workspace file, not in the runner's memory.
    assert measured["size"] > 150 * MiB
    growth = measured["peak"] - measured["baseline"]
    assert growth < 64 * MiB, f"peak RSS grew by {growth / MiB:.0f} MiB during a file-backed full read"
    assert database_files(workspace) == []
