"""Runner configuration from the environment, and the worker's settings bounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from hivemind.errors import InvalidInput
from hivemind.models import TeeKind
from hivemind_runner.__main__ import make_tee, read_release, runner_id_for
from hivemind_runner.config import BackendChoice, RunnerSettings, host_runner_id
from hivemind_runner.tee import DEFAULT_APP_COMPOSE, SimulatedTee, TeeError, TeeUnavailable, compose_hash_of
from hivemind_runner.worker import WorkerSettings


def test_defaults_are_production_ones() -> None:
    settings = RunnerSettings.from_env({})
    assert settings.tee is TeeKind.TDX
    assert (settings.wait_time_s, settings.visibility_timeout_s, settings.max_attempts) == (20, 900, 3)
    assert settings.backend is BackendChoice.AUTO and settings.concurrency == 2
    assert settings.store.prefix == "hivemind"


def test_environment_is_read_and_checked(tmp_path: Path) -> None:
    settings = RunnerSettings.from_env(
        {
            "HIVEMIND_PREFIX": "dev-stack",
            "HIVEMIND_TEE": "simulated",
            "HIVEMIND_RUNNER_SEED_FILE": str(tmp_path / "seed"),
            "HIVEMIND_RUNNER_COMPOSE_HASH": "ab" * 32,
            "HIVEMIND_RUNNER_CONCURRENCY": "4",
            "HIVEMIND_RUNNER_BACKEND": "process",
            "HIVEMIND_RUNNER_ID": "runner_dev",
        }
    )
    assert settings.store.prefix == "dev-stack" and settings.tee is TeeKind.SIMULATED
    assert settings.concurrency == 4 and settings.backend is BackendChoice.PROCESS
    tee = make_tee(settings)
    assert isinstance(tee, SimulatedTee) and tee.identity().compose_hash == "ab" * 32
    assert runner_id_for(settings, None) == "runner_dev"


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("HIVEMIND_TEE", "sgx", "HIVEMIND_TEE"),
        ("HIVEMIND_RUNNER_CONCURRENCY", "0", "HIVEMIND_RUNNER_CONCURRENCY"),
        ("HIVEMIND_RUNNER_WAIT_S", "21", "HIVEMIND_RUNNER_WAIT_S"),
        ("HIVEMIND_RUNNER_ID", "Runner One", "HIVEMIND_RUNNER_ID"),
        ("HIVEMIND_RUNNER_COMPOSE_HASH", "abc", "HIVEMIND_RUNNER_COMPOSE_HASH"),
    ],
)
def test_malformed_values_stop_the_runner_and_name_the_variable(
    variable: str, value: str, named: str
) -> None:
    with pytest.raises(InvalidInput, match=named):
        RunnerSettings.from_env({"HIVEMIND_TEE": "simulated", variable: value})


def test_a_compose_hash_override_is_refused_on_tdx() -> None:
    with pytest.raises(InvalidInput, match="simulated TEE only"):
        RunnerSettings.from_env({"HIVEMIND_RUNNER_COMPOSE_HASH": "ab" * 32})


def test_visibility_heartbeat_must_beat_the_timeout() -> None:
    with pytest.raises(InvalidInput):
        RunnerSettings.from_env(
            {"HIVEMIND_RUNNER_VISIBILITY_S": "10", "HIVEMIND_RUNNER_VISIBILITY_HEARTBEAT_S": "10"}
        )
    with pytest.raises(ValueError, match="heartbeat"):
        WorkerSettings(visibility_timeout_s=10, visibility_heartbeat_s=10)
    with pytest.raises(ValueError, match="20 seconds"):
        WorkerSettings(wait_time_s=30)


def test_tdx_without_a_guest_agent_fails_at_start_with_a_clear_error(tmp_path: Path) -> None:
    settings = RunnerSettings.from_env({"HIVEMIND_DSTACK_ENDPOINT": str(tmp_path / "no.sock")})
    with pytest.raises(TeeUnavailable, match="dstack"):
        make_tee(settings)


def test_runner_id_defaults_to_the_instance_then_the_host() -> None:
    settings = RunnerSettings.from_env({})
    assert runner_id_for(settings, "ab12") == "runner_ab12"
    assert runner_id_for(settings, None) == host_runner_id()
    assert host_runner_id().startswith("runner_") and len(host_runner_id()) == 23


def test_release_statement_file_is_read_or_refused(tmp_path: Path) -> None:
    assert read_release(None) is None
    bad = tmp_path / "release.json"
    bad.write_text("{}")
    with pytest.raises(TeeError):
        read_release(bad)


def test_default_simulated_compose_hash_is_the_deployed_one(tmp_path: Path) -> None:
    settings = RunnerSettings.from_env(
        {"HIVEMIND_TEE": "simulated", "HIVEMIND_RUNNER_SEED_FILE": str(tmp_path / "s")}
    )
    assert make_tee(settings).identity().compose_hash == compose_hash_of(DEFAULT_APP_COMPOSE)
