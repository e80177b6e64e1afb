"""Each benchmark script runs at a minimal size and prints its summary line (the figures themselves are
measured by ``make bench``, never asserted here)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent


def run_script(name: str, *args: str, timeout_s: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH / name), *args],
        cwd=BENCH,
        env={key: value for key, value in os.environ.items() if not key.startswith("HMCTL_")},
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout_s,
    )


def docker_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "info"], capture_output=True, check=False, timeout=60)
    return probe.returncode == 0


needs_docker = pytest.mark.skipif(not docker_answers(), reason="no Docker engine answers")


@pytest.mark.slow
def test_bench_seal_prints_its_ratio() -> None:
    completed = run_script("bench_seal.py", "--size-mb", "4", "--repeat", "1")
    assert completed.returncode == 0, completed.stderr
    assert "seal/raw throughput ratio:" in completed.stdout


@pytest.mark.slow
@pytest.mark.moto_server
def test_bench_api_prints_its_latencies_and_import_budget() -> None:
    completed = run_script("bench_api.py", "--requests", "3", "--imports", "1")
    # Exit 1 means the handler imported over budget on a busy machine: still a complete run.
    assert completed.returncode in (0, 1), completed.stderr
    assert "POST /v1/rooms/{id}/runs" in completed.stdout
    assert "API handler cold import budget" in completed.stdout


@pytest.mark.slow
@pytest.mark.docker
@needs_docker
def test_bench_e2e_quick_prints_each_figure() -> None:
    completed = run_script("bench_e2e.py", "--quick")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "figure 1: ask -> verified answer median" in completed.stdout
    assert "figure 2: cold" in completed.stdout
    assert "figure 5: concurrency 2:" in completed.stdout


@pytest.mark.slow
@pytest.mark.docker
@needs_docker
def test_bench_scale_quick_prints_the_peak_runner_memory() -> None:
    completed = run_script("bench_scale.py", "--quick")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "figure 4: 1 MB: peak runner memory median" in completed.stdout
