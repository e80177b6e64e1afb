"""Room data of 1 MB, 100 MB and 1 GB: upload, runner decrypt and load, peak runner memory (a plain script
for ``make bench``, not a pytest test).

For each size, ``--repeat`` times: a fresh room on the local stack (default agents, the sample rules:
aggregates of ``salary`` by ``department``, every other column hidden) gets one CSV item of that size,
generated on the fly into a temporary directory (the sample's three columns plus five the policy
hides: id, email, city, start date, notes; about 160 bytes a row). Measured:

- **upload**: the owner's client seals the file (HMS1, streaming to a temporary file) and PUTs it to the
  presigned URL of the local S3 (moto), then commits it (the control plane checks size and SHA-256);
- **runner decrypt and load**, from the runner's ``phase_ms`` log: stream-decrypting the item into the
  run's tmpfs workspace (with the agents fetched meanwhile), the scope stage's full-read database (a
  file in the workspace), and the query stage's projection (in memory: two columns of every row);
- **peak runner memory**: the runner process's ``VmHWM``, reset (``/proc/PID/clear_refs``) just before
  the ask, and its ``VmRSS`` before; plus the peak size of the run's tmpfs workspace, sampled.

The participant's ask is the usual one ("average salary by department") with a 600 s budget. Exits 1
when the peak runner memory of a 1 GB (or larger) dataset is 512 MiB or more. Unless ``--no-doc``, the
table replaces the generated block of docs/performance.md.

    python tests/bench/bench_scale.py [--sizes 1,100,1000] [--repeat 3] [--quick] [--no-doc]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from benchkit import (
    OWNER,
    BenchError,
    LocalStack,
    Spread,
    create_room,
    load_sampler,
    machine,
    machine_line,
    markdown_table,
    replace_section,
    runner_timeline,
    timed_ask,
)

from hivemind.models import Budgets
from hmctl.client import ApiClient
from hmctl.rooms import add_item, room_dek

SHM = Path("/dev/shm")
MB = 1_000_000
MiB = 1024 * 1024
MEMORY_BOUND = 512 * MiB
WORKSPACE_MB = 4096  # a 1 GB item plus its full-read database need more than the default 2048
BUDGETS = Budgets(timeout_s=600, llm_calls=0, tokens=0, memory_mb=256)
_DEPARTMENTS = ("Engineering", "Sales", "Support", "Marketing", "Legal", "Finance", "Operations")
_CITIES = ("Lisbon", "Osaka", "Toronto", "Nairobi", "Lyon", "Austin", "Pune", "Krakow")


def write_people(path: Path, size: int) -> int:
    """About ``size`` bytes of people (at least one row per department group); returns the rows."""
    rows = 0
    with path.open("w", encoding="utf-8") as out:
        out.write("name,department,salary,employee_id,email,city,start_date,notes\n")
        while out.tell() < size:
            out.write(
                "".join(
                    f"Person {n},{_DEPARTMENTS[n % 7]},{40_000 + (n * 7919) % 120_000},E{n:09d},"
                    f"person{n}@example.com,{_CITIES[n % 8]},20{10 + n % 14}-0{1 + n % 9}-1{n % 9},"
                    f"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod {n % 97}\n"
                    for n in range(rows, rows + 2_000)
                )
            )
            rows += 2_000
    return rows


# --- the runner process ------------------------------------------------------------------------------


def _status_bytes(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"/proc/{pid}/status has no {field}")


def reset_peak(pid: int) -> int:
    """Reset the process's peak RSS to its current RSS (Linux >= 4.0); returns that RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return _status_bytes(pid, "VmRSS")


def _used(path: Path) -> int:
    stats = os.statvfs(path)
    return (stats.f_blocks - stats.f_bfree) * stats.f_frsize


@contextlib.contextmanager
def tmpfs_sampler(
    root: Path, workspace: list[int], shm: list[int], interval_s: float = 0.25
) -> Iterator[None]:
    """While the block runs: bytes used by the run tmpfs mounts under ``root``, and the growth of
    ``/dev/shm`` (where the runner's SQLite sorts spill; other processes' files count too)."""
    stop = threading.Event()
    shm_before = _used(SHM)

    def sample() -> None:
        while not stop.is_set():
            for entry in root.glob("run_*"):
                with contextlib.suppress(OSError):
                    if os.path.ismount(entry):
                        workspace.append(_used(entry))
            shm.append(max(0, _used(SHM) - shm_before))
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


# --- one measurement ---------------------------------------------------------------------------------


@dataclass
class Sample:
    size: int
    seal_s: float
    put_s: float
    upload_s: float  # seal + declare + PUT + commit
    inputs_s: float  # decrypt (agents fetched meanwhile)
    full_read_s: float
    projection_s: float
    run_s: float  # the runner's whole run
    rss_before: int
    peak_rss: int
    workspace_peak: int | None
    shm_growth: int
    total_s: float


class _Transfers:
    """A ``transfer(description, total)`` for :func:`hmctl.rooms.add_item` that times each step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, description: str, total: int) -> Iterator[object]:
        del total
        start = time.perf_counter()
        yield lambda _count: None
        self.seconds[description.split(maxsplit=1)[0]] = time.perf_counter() - start


def measure(stack: LocalStack, data: Path, workspace_root: Path) -> Sample:
    room = create_room(stack, data=None, name=f"scale-{data.stat().st_size}")
    store = stack.profiles()
    owner = store.load(OWNER)
    assert owner.tenant_id is not None
    transfers = _Transfers()
    with ApiClient.for_secret(owner.service, owner.secret()) as api:
        started = time.perf_counter()
        dek = room_dek(api, owner.secret(), room.room_id, owner.tenant_id)
        add_item(
            api,
            room_id=room.room_id,
            owner_tenant_id=owner.tenant_id,
            dek=dek,
            path=data,
            metadata={"table": "people"},
            content_type="text/csv",
            transfer=transfers,
        )
        upload_s = time.perf_counter() - started
    rss_before = reset_peak(stack.runner_pid)
    used: list[int] = []
    shm: list[int] = []
    with tmpfs_sampler(workspace_root, used, shm):
        ask = timed_ask(store, room.link, budgets=BUDGETS)
    peak = _status_bytes(stack.runner_pid, "VmHWM")
    if ask.status != "completed" or "Engineering" not in ask.output:
        raise BenchError(f"run {ask.run_id} ended {ask.status}: {ask.output[:200]!r}")
    timeline = runner_timeline(stack.runner_log, ask.run_id)
    if timeline is None or not timeline.phases:
        raise BenchError(f"the runner logged no phases for {ask.run_id}")
    return Sample(
        size=data.stat().st_size,
        seal_s=transfers.seconds.get("sealing", 0.0),
        put_s=transfers.seconds.get("uploading", 0.0),
        upload_s=upload_s,
        inputs_s=timeline.ms("inputs") / 1000,
        full_read_s=timeline.ms("scope_load") / 1000,
        projection_s=timeline.ms("query_load") / 1000,
        run_s=sum(ms for name, ms in timeline.phases.items() if name != "settle") / 1000,
        rss_before=rss_before,
        peak_rss=peak,
        workspace_peak=max(used) if used else None,
        shm_growth=max(shm) if shm else 0,
        total_s=ask.total,
    )


# --- report ------------------------------------------------------------------------------------------


def _label(size_mb: int) -> str:
    return f"{size_mb // 1000} GB" if size_mb >= 1000 else f"{size_mb} MB"


def report(results: dict[int, list[Sample]]) -> tuple[str, list[str], bool]:
    rows: list[list[str]] = []
    summaries: list[str] = []
    bounded = True
    for size_mb, samples in results.items():

        def cells(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
            spread = Spread.of(values)
            return " / ".join(spread.cells(scale, digits))

        peak = Spread.of(s.peak_rss for s in samples)
        mb = samples[0].size / MB
        rows.append(
            [
                _label(size_mb),
                cells([s.seal_s for s in samples]),
                cells([s.put_s for s in samples]),
                cells([s.upload_s for s in samples]),
                cells([s.inputs_s for s in samples]),
                f"{mb / Spread.of(s.inputs_s for s in samples).median:.0f}",
                cells([s.full_read_s for s in samples]),
                cells([s.projection_s for s in samples]),
                cells([s.total_s for s in samples]),
                cells([s.rss_before for s in samples], 1 / MiB, 0),
                cells([s.peak_rss for s in samples], 1 / MiB, 0),
                cells([s.workspace_peak or 0 for s in samples], 1 / MiB, 0),
                cells([s.shm_growth for s in samples], 1 / MiB, 0),
            ]
        )
        summaries.append(
            f"figure 4: {_label(size_mb)}: peak runner memory median {peak.median / MiB:.0f} MiB "
            f"(max {peak.high / MiB:.0f}); decrypt {Spread.of(s.inputs_s for s in samples).median:.1f} s, "
            f"full read {Spread.of(s.full_read_s for s in samples).median:.1f} s, projection "
            f"{Spread.of(s.projection_s for s in samples).median:.1f} s"
        )
        if size_mb >= 1000 and peak.high >= MEMORY_BOUND:
            bounded = False
    if any(size_mb >= 1000 for size_mb in results):
        summaries.append(
            "figure 4: peak runner memory for 1 GB under 512 MiB: " + ("met" if bounded else "NOT met")
        )
    header = [
        "data",
        "seal s",
        "PUT s",
        "upload total s",
        "runner decrypt s",
        "decrypt MB/s (median)",
        "full read s",
        "projection s",
        "ask -> answer s",
        "runner RSS before MiB",
        "peak runner RSS MiB",
        "peak workspace MiB",
        "peak /dev/shm growth MiB",
    ]
    text = (
        "**Figure 4. Scaling by dataset size: upload, runner decrypt and load, peak memory** (each cell "
        f"min / median / max over {len(next(iter(results.values())))} repeats; every repeat a new room and "
        "a new upload).\n\n" + markdown_table(header, rows)
    )
    return text, summaries, bounded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,100,1000", help="dataset sizes in MB (10^6 bytes)")
    parser.add_argument("--repeat", type=int, default=3, help="rooms (upload and ask) per size")
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 MB once, no doc update")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/performance.md alone")
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.repeat, args.no_doc = "1", 1, True
    sizes = [int(size) for size in args.sizes.split(",") if size]
    loads: list[tuple[float, float, float]] = []
    results: dict[int, list[Sample]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="hivemind-bench-scale-") as tmp,
        load_sampler(loads),
        LocalStack(Path(tmp) / "stack") as stack,
    ):
        stack.restart_runner({"HIVEMIND_RUNNER_WORKSPACE_MB": str(WORKSPACE_MB)})
        workspace_root = stack.runner_workspace()
        for size_mb in sizes:
            data = Path(tmp) / f"people-{size_mb}mb.csv"
            write_people(data, size_mb * MB)
            results[size_mb] = [measure(stack, data, workspace_root) for _ in range(args.repeat)]
            data.unlink()
            print(f"measured {_label(size_mb)}", file=sys.stderr)
    text, summaries, bounded = report(results)
    document = machine_line(machine(), loads) + "\n\n" + text
    print(document)
    print()
    for line in summaries:
        print(line)
    if not args.no_doc:
        replace_section("scale", document)
    return 0 if bounded else 1


if __name__ == "__main__":
    sys.exit(main())
