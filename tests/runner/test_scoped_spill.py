"""SQLite's sort and grouping scratch: in tmpfs files once the runner set that up, never on a disk.

The setting is process-wide, so everything that sets it runs in a subprocess of its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from hivemind_runner.scoped.spill import RAM_FILESYSTEMS, filesystem_type

MiB = 1024 * 1024

MEASURE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from hivemind.models import Stage
    from hivemind.policy import parse_policy
    from hivemind_runner.scoped import ItemInfo, RoomItem, build_scoped_database
    from hivemind_runner.scoped.spill import spill_to, temp_store

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        raise LookupError(field)

    path, spill = Path(sys.argv[1]), sys.argv[2]
    spilled = spill_to(Path(spill)) if spill != "-" else None
    item = RoomItem.from_path(
        ItemInfo(id="item_wide", name="wide.csv", content_type="text/csv", size=path.stat().st_size), path
    )
    policy = parse_policy({
        "tables": {"wide": {"columns": ["label", "detail"]}},
        "aggregate": {"required": True, "min_group_size": 1, "functions": ["COUNT"]},
        "max_rows": 10,
    })
    with build_scoped_database([item], policy) as database:
        Path("/proc/self/clear_refs").write_text("5")
        baseline = status("VmHWM")
        rows = database.query(
            "SELECT label, detail, COUNT(*) FROM wide GROUP BY label, detail ORDER BY 3 DESC LIMIT 1",
            role=Stage.QUERY,
        ).rows
        peak = status("VmHWM")
    measured = {"spilled": spilled, "temp_store": temp_store(), "growth": peak - baseline, "rows": rows}
    print(json.dumps(measured))
    """
)


def write_wide_csv(path: Path, rows: int = 600_000) -> None:
    with path.open("w") as out:
        out.write("label,detail\n")
        for start in range(0, rows, 10_000):
            batch = range(start, start + 10_000)
            out.write("".join(f"label-{i % 50_000:06d},{'d' * 80}{i}\n" for i in batch))


def measure(csv: Path, spill: str) -> dict[str, object]:
    completed = subprocess.run(
        [sys.executable, "-c", MEASURE, str(csv), spill],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return json.loads(completed.stdout)


def test_filesystem_types_come_from_the_mount_table(tmp_path: Path) -> None:
    assert filesystem_type(Path("/proc/self")) == "proc"
    assert filesystem_type(Path("/dev/shm")) in RAM_FILESYSTEMS
    assert filesystem_type(tmp_path) is not None


@pytest.mark.slow
def test_a_grouping_query_spills_to_tmpfs_not_to_the_runner_heap(tmp_path: Path) -> None:
    csv = tmp_path / "wide.csv"
    write_wide_csv(csv)
    in_memory = measure(csv, "-")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        spilled = measure(csv, str(Path(shm) / "spill"))
        assert list((Path(shm) / "spill").iterdir()) == []  # SQLite unlinks its files on open
    assert in_memory["temp_store"] == "MEMORY" and spilled["temp_store"] == "FILE"
    assert spilled["spilled"] is True
    assert spilled["rows"] == in_memory["rows"]
    # The sort of ~600k wide rows costs the heap tens of MiB in memory, a bounded working set spilled.
    assert int(in_memory["growth"]) > 40 * MiB
    assert int(spilled["growth"]) < 16 * MiB


def test_a_directory_on_a_disk_is_refused_and_scratch_stays_in_memory(tmp_path: Path) -> None:
    if filesystem_type(tmp_path) in RAM_FILESYSTEMS:
        pytest.skip("the temporary directory is itself on tmpfs here")
    csv = tmp_path / "wide.csv"
    write_wide_csv(csv, rows=20_000)
    measured = measure(csv, str(tmp_path / "spill"))
    assert measured["spilled"] is False
    assert measured["temp_store"] == "MEMORY"
