"""Ask to verified answer on the local stack (a plain script for ``make bench``, not a pytest test).

Figures (docs/performance.md, "Ask to verified answer"):

1. **Warm ask**: a participant asks the sample people room (default scope, query and mediator agents,
   deterministic, no LLM) through the client library exactly as ``hmctl room ask`` runs it, end to end
   and by phase: the client's checks, the submission, the queue, each step of the runner (from its
   ``phase_ms`` log), the long poll, and the client's download, decryption and receipt check. Baseline,
   measured in the same run and interleaved with the asks: three bare sequential
   ``docker run --rm --network none hivemind/agent-base:local python3 -c pass``. The same ask through a
   fresh ``hmctl room ask`` process (interpreter start-up and imports included) is reported beside it.
2. **Cold vs warm**: the first ask of a room whose agents the runner has never seen (fresh copies of the
   default agents, so new source digests and three image builds), the first ask after a runner restart
   (images in the engine, none in the runner's memory), a warm ask with pre-started sandboxes turned
   off (``HIVEMIND_RUNNER_PRESTART=false``: each stage's container started when the stage begins) and
   the warm ask of figure 1 (every stage's container started with the run).
3. **Throughput** (figure 5 of the issue): ``--burst`` participants ask at once; the runner runs at most
   ``HIVEMIND_RUNNER_CONCURRENCY`` of them at a time (1, 2, 4): runs per minute and latency, against
   concurrency 1 measured in the same run.

The stack is ``hmctl dev up --background`` in a private temporary directory, stopped at the end.
Unless ``--no-doc``, the tables replace the generated block of docs/performance.md. Exits 1 when the
median warm ask is not within 2x its baseline or not under 3 s (not with ``--quick``, a smoke run).

    python tests/bench/bench_e2e.py [--repeat 9] [--cold 3] [--burst 8] [--quick] [--no-doc]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchkit import (
    PARTICIPANT,
    QUESTION,
    SAMPLE_DATA,
    AgentDirs,
    AskTiming,
    BenchError,
    LocalStack,
    RunnerTimeline,
    Spread,
    bare_containers,
    create_room,
    deliver,
    load_sampler,
    machine,
    machine_line,
    markdown_table,
    replace_section,
    runner_timeline,
    submit_only,
    timed_ask,
)

from hivemind.archive import pack_directory, validate_archive

TARGET_RATIO = 2.0
TARGET_MEDIAN_S = 3.0
_HMCTL = "import sys; from hmctl.main import app; sys.argv[0] = 'hmctl'; app()"

# Table rows of figure 1: (label, how to get seconds from one ask and its runner timeline).
Phase = Callable[[AskTiming, RunnerTimeline | None], float | None]


def _runner_ms(*names: str) -> Phase:
    def phase(_ask: AskTiming, runner: RunnerTimeline | None) -> float | None:
        if runner is None or not runner.phases:
            return None
        return runner.ms(*names) / 1000

    return phase


def _queue_wait(ask: AskTiming, runner: RunnerTimeline | None) -> float | None:
    if runner is None or "start" not in runner.phases:
        return None
    return runner.started - runner.phases["start"] / 1000 - ask.submitted


def _poll_lag(ask: AskTiming, runner: RunnerTimeline | None) -> float | None:
    if runner is None or "finish" not in runner.phases:
        return None
    return ask.finished - runner.at("finish")


PHASES: list[tuple[str, Phase]] = [
    ("client: verify room, acceptance and runner attestation", lambda a, _r: a.verified - a.begin),
    ("client: seal and submit (admission, hold, envelope, queue)", lambda a, _r: a.submitted - a.verified),
    ("queue wait (submission answered -> runner takes the run)", _queue_wait),
    ("runner: take the run (run row `running`)", _runner_ms("start")),
    ("runner: verify manifest and its own trust", _runner_ms("verify")),
    ("runner: open envelope, unwrap room key", _runner_ms("envelope")),
    ("runner: decrypt items, fetch and check agents (in parallel)", _runner_ms("inputs")),
    ("runner: images ready", _runner_ms("images")),
    ("stage: scope (full-read database, container, policy)", _runner_ms("scope_load", "scope")),
    ("stage: query (scoped database, container, answer)", _runner_ms("query_load", "query")),
    ("stage: mediator (container, final answer)", _runner_ms("mediator_load", "mediator")),
    ("gate, last container's exit, pipeline bookkeeping", _runner_ms("gate", "teardown", "pipeline")),
    ("sealing output and key", _runner_ms("seal")),
    ("workspace wipe", _runner_ms("wipe")),
    ("receipt signed and stored; run row finished", _runner_ms("receipt", "finish")),
    ("client: long poll sees the finished run", _poll_lag),
    ("client: download, decrypt, verify receipt", lambda a, _r: a.delivered - a.finished),
]


def _spread_row(
    label: str, values: Sequence[float | None], scale: float = 1000.0, digits: int = 0
) -> list[str]:
    present = [value for value in values if value is not None]
    if not present:
        return [label, "n/a", "n/a", "n/a"]
    return [label, *Spread.of(present).cells(scale, digits)]


def _cli_ask(stack: LocalStack, link: str) -> float:
    start = time.perf_counter()
    completed = subprocess.run(  # the hmctl a user runs, in a fresh interpreter
        [sys.executable, "-c", _HMCTL, "--profile", PARTICIPANT, "room", "ask", link, QUESTION, "--json"],
        env=stack.env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    elapsed = time.perf_counter() - start
    if completed.returncode != 0:
        raise BenchError(f"hmctl room ask failed: {completed.stderr[-500:]}")
    return elapsed


def _checked(ask: AskTiming) -> AskTiming:
    if ask.status != "completed" or "Engineering" not in ask.output:
        raise BenchError(f"run {ask.run_id} ended {ask.status}: {ask.output[:200]!r}")
    return ask


# --- figure 1 ---------------------------------------------------------------------------------------


def figure_warm(stack: LocalStack, link: str, repeat: int, cli_repeat: int) -> tuple[str, list[str], bool]:
    store = stack.profiles()
    _checked(timed_ask(store, link))  # warm-up: the runner prepares (or finds) the images once
    asks: list[AskTiming] = []
    timelines: list[RunnerTimeline | None] = []
    baselines: list[float] = []
    ratios: list[float] = []
    for _ in range(repeat):
        baseline = bare_containers(3)
        ask = _checked(timed_ask(store, link))
        asks.append(ask)
        timelines.append(runner_timeline(stack.runner_log, ask.run_id))
        baselines.append(baseline)
        ratios.append(ask.total / baseline)
    cli = [_cli_ask(stack, link) for _ in range(cli_repeat)]

    totals = Spread.of(ask.total for ask in asks)
    base = Spread.of(baselines)
    ratio = statistics.median(ratios)
    met = ratio <= TARGET_RATIO and totals.median < TARGET_MEDIAN_S
    pairs = list(zip(asks, timelines, strict=True))
    rows = [_spread_row(label, [phase(a, r) for a, r in pairs]) for label, phase in PHASES]
    rows.append(["**ask -> verified answer (total)**", *[f"**{cell}**" for cell in totals.cells(1000, 0)]])
    baseline_label = "baseline: 3 bare `docker run --rm --network none` (`python3 -c pass`)"
    rows.append([baseline_label, *base.cells(1000, 0)])
    rows.append(["ratio ask / baseline (per repeat)", *Spread.of(ratios).cells(1, 2)])
    if cli:
        label = "`hmctl room ask` in a fresh process (start-up and imports included)"
        rows.append([label, *Spread.of(cli).cells(1000, 0)])
    summary = (
        f"figure 1: ask -> verified answer median {totals.median:.2f} s (min {totals.low:.2f}, max "
        f"{totals.high:.2f}, n={totals.count}); baseline 3 bare containers median {base.median:.2f} s; "
        f"ratio {ratio:.2f} (target <= {TARGET_RATIO:.1f} and < {TARGET_MEDIAN_S:.0f} s): "
        + ("met" if met else "NOT met")
    )
    table = markdown_table(["phase (ms)", "min", "median", "max"], rows)
    stage_rows = []
    for stage in ("scope", "query", "mediator"):
        values = [r.stage_ms.get(stage) / 1000 if r and stage in r.stage_ms else None for r in timelines]
        stage_rows.append(_spread_row(f"{stage}: stage start to container exit", values))
    text = (
        f"**Figure 1. Warm ask -> verified answer: median {totals.median * 1000:.0f} ms, "
        f"{ratio:.2f}x the baseline of three bare containers ({base.median * 1000:.0f} ms)** "
        f"({repeat} asks, each after its baseline).\n\n{table}\n\n"
        "Sandbox time per stage (the `duration_ms` in receipts: from the stage's start, when its session "
        "is served to its waiting container, to the container's exit, overlapping the next stage since the "
        "runner goes on as soon as a stage posted its answer):\n\n"
        + markdown_table(["stage (ms)", "min", "median", "max"], stage_rows)
    )
    return text, [summary], met


# --- figure 2 ---------------------------------------------------------------------------------------


Measured = tuple[AskTiming, RunnerTimeline | None, float]  # an ask, its runner timeline, its baseline


def _measured(stack: LocalStack, link: str) -> Measured:
    baseline = bare_containers(3)
    ask = _checked(timed_ask(stack.profiles(), link))
    return ask, runner_timeline(stack.runner_log, ask.run_id), baseline


def figure_cold(stack: LocalStack, scratch: Path, warm_link: str, cold: int) -> tuple[str, list[str]]:
    cold_asks: list[Measured] = []
    digests: list[str] = []
    for _ in range(cold):
        nonce = uuid.uuid4().hex[:12]
        agents = AgentDirs.fresh_copies(scratch, nonce)
        digests.extend(_digest(path) for path in (agents.scope, agents.query, agents.mediator))
        room = create_room(stack, data=SAMPLE_DATA, agents=agents, name=f"cold-{nonce}")
        cold_asks.append(_measured(stack, room.link))
    restarted: list[Measured] = []
    for _ in range(cold):
        stack.restart_runner({})
        restarted.append(_measured(stack, warm_link))
    # Warm, with every container started when its stage begins, then as configured by default.
    stack.restart_runner({"HIVEMIND_RUNNER_PRESTART": "false"})
    _checked(timed_ask(stack.profiles(), warm_link))
    unstarted = [_measured(stack, warm_link) for _ in range(cold)]
    stack.restart_runner({})
    _checked(timed_ask(stack.profiles(), warm_link))
    warm = [_measured(stack, warm_link) for _ in range(cold)]
    _remove_images(digests)
    cases = [
        ("cold: new agents, three image builds", cold_asks),
        ("runner restarted: images in the engine, not in the runner's memory", restarted),
        ("warm, pre-start off: each stage's container started when the stage begins", unstarted),
        ("warm: images prepared, every stage's container started with the run", warm),
    ]
    rows: list[list[str]] = []
    for label, runs in cases:
        totals = Spread.of(ask.total for ask, _, _ in runs)
        images = [r.ms("images") / 1000 if r is not None and r.phases else None for _, r, _ in runs]
        ratio = statistics.median(ask.total / baseline for ask, _, baseline in runs)
        rows.append([label, *totals.cells(1000, 0), _spread_row("", images)[2], f"{ratio:.2f}x"])
    medians = {label: Spread.of(ask.total for ask, _, _ in runs).median for label, runs in cases}
    cold_median, off_median, warm_median = (medians[cases[i][0]] for i in (0, 2, 3))
    text = (
        f"**Figure 2. Cold vs warm: the first ask of new agents takes {cold_median:.1f} s, "
        f"{cold_median / warm_median:.1f}x a warm ask; starting every container with the run makes a warm "
        f"ask {off_median / warm_median:.2f}x faster than starting each when its stage begins** "
        f"({cold} asks per case, each after its own baseline of three bare containers).\n\n"
        + markdown_table(
            ["case", "total ms: min", "median", "max", "images ready ms (median)", "ask / baseline (median)"],
            rows,
        )
    )
    return text, [
        f"figure 2: cold {cold_median:.2f} s, warm {warm_median:.2f} s, warm without pre-start "
        f"{off_median:.2f} s median"
    ]


def _digest(path: Path) -> str:
    return validate_archive(pack_directory(path)).digest


def _remove_images(digests: Sequence[str]) -> None:
    for digest in digests:
        subprocess.run(
            ["docker", "image", "rm", "--force", f"hivemind/agent:{digest.removeprefix('sha256:')}"],
            capture_output=True,
            check=False,
            timeout=120,
        )


# --- figure 5 ---------------------------------------------------------------------------------------


def _burst(stack: LocalStack, link: str, count: int) -> tuple[float, list[float]]:
    """``count`` participants ask at once; the makespan and each ask's latency, in seconds."""
    store = stack.profiles()

    def one(_: int) -> tuple[float, float]:
        begin = time.time()
        _run_id, api, ticket = submit_only(store, link)
        with api:
            status = deliver(api, ticket)
        if status != "completed":
            raise BenchError(f"run {ticket.run_id} ended {status}")
        return begin, time.time()

    with ThreadPoolExecutor(max_workers=count) as pool:
        spans = list(pool.map(one, range(count)))
    makespan = max(end for _, end in spans) - min(begin for begin, _ in spans)
    return makespan, [end - begin for begin, end in spans]


def figure_throughput(
    stack: LocalStack, link: str, burst: int, repeat: int, levels: Sequence[int]
) -> tuple[str, list[str]]:
    rows: list[list[str]] = []
    summaries: list[str] = []
    base_rate: float | None = None
    for level in levels:
        stack.restart_runner({"HIVEMIND_RUNNER_CONCURRENCY": str(level)})
        _checked(timed_ask(stack.profiles(), link))
        rates: list[float] = []
        latencies: list[float] = []
        for _ in range(repeat):
            makespan, spans = _burst(stack, link, burst)
            rates.append(burst / makespan * 60)
            latencies.extend(spans)
        rate = Spread.of(rates)
        base_rate = base_rate or rate.median
        latency = Spread.of(latencies)
        rows.append(
            [
                str(level),
                *rate.cells(1, 1),
                f"{rate.median / base_rate:.2f}x",
                *latency.cells(1000, 0),
            ]
        )
        summaries.append(f"figure 5: concurrency {level}: {rate.median:.1f} runs/min median")
    text = (
        f"**Figure 5. Runner throughput: {burst} participants ask at once, repeated {repeat} times per "
        f"concurrency.**\n\n"
        + markdown_table(
            [
                "concurrency",
                "runs/min: min",
                "median",
                "max",
                "vs concurrency 1",
                "latency ms: min",
                "median",
                "max",
            ],
            rows,
        )
    )
    return text, summaries


# --- main -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9, help="warm asks (and baselines) for figure 1")
    parser.add_argument("--cli-repeat", type=int, default=3, help="asks through a fresh hmctl process")
    parser.add_argument("--cold", type=int, default=3, help="asks per case of figure 2 (0: skip)")
    parser.add_argument("--burst", type=int, default=8, help="asks submitted at once for figure 5 (0: skip)")
    parser.add_argument("--burst-repeat", type=int, default=3, help="bursts per concurrency level")
    parser.add_argument("--concurrency", default="1,2,4", help="runner concurrency levels for figure 5")
    parser.add_argument(
        "--runner-pythonpath",
        default=None,
        help="run the stack's runner from another source tree (before/after comparisons)",
    )
    parser.add_argument(
        "--api-pythonpath",
        default=None,
        help="restart the stack's control plane from another source tree (what-if comparisons)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny sizes, no doc update")
    parser.add_argument("--no-doc", action="store_true", help="print only; leave docs/performance.md alone")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeat, args.cli_repeat, args.cold, args.burst, args.burst_repeat = 1, 0, 1, 2, 1
        args.concurrency, args.no_doc = "2", True
    levels = [int(level) for level in args.concurrency.split(",") if level]
    loads: list[tuple[float, float, float]] = []
    sections: list[str] = []
    summaries: list[str] = []
    met = True
    with (
        tempfile.TemporaryDirectory(prefix="hivemind-bench-e2e-") as tmp,
        load_sampler(loads),
        LocalStack(Path(tmp) / "stack") as stack,
    ):
        if args.runner_pythonpath:
            stack.restart_runner({}, pythonpath=args.runner_pythonpath)
        if args.api_pythonpath:
            stack.restart_api(args.api_pythonpath)
        room = create_room(stack, data=SAMPLE_DATA)
        text, lines, met = figure_warm(stack, room.link, args.repeat, args.cli_repeat)
        sections.append(text)
        summaries += lines
        if args.cold:
            text, lines = figure_cold(stack, Path(tmp), room.link, args.cold)
            sections.append(text)
            summaries += lines
        if args.burst:
            text, lines = figure_throughput(stack, room.link, args.burst, args.burst_repeat, levels)
            sections.append(text)
            summaries += lines
    report = machine_line(machine(), loads) + "\n\n" + "\n\n".join(sections)
    print(report)
    print()
    for line in summaries:
        print(line)
    if not args.no_doc:
        replace_section("e2e", report)
    # A smoke run is too short to judge the targets; it only has to complete.
    return 0 if met or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
