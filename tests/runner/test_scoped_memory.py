"""Loading streams: a ~200 MB CSV with a narrow projection loads with a small, bounded peak RSS."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

MiB = 1024 * 1024
CSV_BYTES = 200 * MiB
# Growth allowed over the baseline: a batch, the interpreter's buffers, and the final projection
# (about 10% of the rows, two narrow columns: a few MiB). Reading the file whole would add 200+ MiB.
MAX_GROWTH = 96 * MiB

MEASURE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from hivemind.models import Stage
    from hivemind.policy import parse_policy
    from hivemind_runner.scoped import ItemInfo, RoomItem, build_scoped_database

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        raise LookupError(field)

    path = Path(sys.argv[1])
    item = RoomItem.from_path(
        ItemInfo(id="item_big", name="people.csv", content_type="text/csv", size=path.stat().st_size), path
    )
    policy = parse_policy({
        "tables": {"people": {"columns": ["department", "salary"], "where": "region = 'eu'"}},
        "aggregate": {"required": True, "min_group_size": 5, "functions": ["COUNT", "AVG"]},
    })
    try:  # reset the peak to the current RSS so imports do not count
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    baseline = status("VmHWM")
    with build_scoped_database([item], policy) as database:
        rows = database.query("SELECT COUNT(*) FROM people", role=Stage.QUERY).rows
    print(json.dumps({"baseline": baseline, "peak": status("VmHWM"), "rows": rows}))
    """
)


def write_people_csv(path: Path) -> int:
    """About CSV_BYTES of people; one row in ten is in the EU. Returns the number of EU rows."""
    filler = "x" * 90
    rows = eu = 0
    with path.open("w") as out:
        out.write("id,name,email,department,salary,region,notes\n")
        while out.tell() < CSV_BYTES:
            lines = []
            for index in range(rows, rows + 10_000):
                region = "eu" if index % 10 == 0 else "us"
                eu += region == "eu"
                lines.append(
                    f"{index},Person {index},p{index}@example.com,dept{index % 20},"
                    f"{30_000 + (index * 7919) % 150_000},{region},{filler}\n"
                )
            rows += 10_000
            out.write("".join(lines))
    return eu


@pytest.mark.slow
def test_a_200_mb_csv_loads_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "people.csv"
    eu_rows = write_people_csv(path)
    assert path.stat().st_size >= CSV_BYTES
    completed = subprocess.run(
        [sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, check=True, timeout=300
    )
    measured = json.loads(completed.stdout)
    assert measured["rows"] == [[eu_rows]]
    growth = measured["peak"] - measured["baseline"]
    assert growth < MAX_GROWTH, f"peak RSS grew by {growth / MiB:.0f} MiB while loading"
