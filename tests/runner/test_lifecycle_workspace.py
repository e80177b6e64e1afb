"""Per-run workspaces: tmpfs when root, 0700 everywhere, wiped after success, failure and crashes."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest
from support.rooms import (
    Tenant,
    agent_ref,
    build_manifest,
    create_room,
    seal_item,
    submit_run,
    upload_agent,
    write_agent_dir,
)
from support.runner_harness import TEST_COMPOSE_HASH, FakePipeline, make_runner

from hivemind.models import RunStatus
from hivemind.store import Store
from hivemind_runner.workspace import WorkspaceError, WorkspaceFactory

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="tmpfs mounts need root")


def mounted(path: Path) -> bool:
    return os.path.ismount(path)


def test_workspace_is_private_and_wiped(tmp_path: Path) -> None:
    factory = WorkspaceFactory(tmp_path / "ws", mount_tmpfs=False)
    with factory.open("run_abc") as workspace:
        assert stat.S_IMODE(workspace.root.stat().st_mode) == 0o700
        assert stat.S_IMODE(factory.root.stat().st_mode) == 0o700
        for directory in (workspace.items, workspace.agents, workspace.scratch):
            assert directory.is_dir() and stat.S_IMODE(directory.stat().st_mode) == 0o700
        (workspace.items / "secret.csv").write_bytes(b"salary,1\n")
    assert not workspace.root.exists()


def test_workspace_is_wiped_when_the_run_raises(tmp_path: Path) -> None:
    factory = WorkspaceFactory(tmp_path / "ws", mount_tmpfs=False)
    with pytest.raises(RuntimeError), factory.open("run_abc") as workspace:
        (workspace.items / "secret.csv").write_bytes(b"salary,1\n")
        raise RuntimeError("boom")
    assert list(factory.root.iterdir()) == []


def test_only_run_ids_name_workspaces(tmp_path: Path) -> None:
    factory = WorkspaceFactory(tmp_path / "ws", mount_tmpfs=False)
    for bad in ("../escape", "run_../x", "", "RUN_A"):
        with pytest.raises(WorkspaceError), factory.open(bad):
            pass


def test_leftovers_of_a_killed_runner_are_swept(tmp_path: Path) -> None:
    factory = WorkspaceFactory(tmp_path / "ws", mount_tmpfs=False)
    stale = factory.root / "run_stale"
    (stale / "items").mkdir(parents=True)
    (stale / "items" / "secret.csv").write_bytes(b"x")
    unrelated = factory.root / "keep-me"
    unrelated.mkdir()
    assert factory.sweep() == 1
    assert not stale.exists() and unrelated.exists()
    # A fresh attempt of the same run never reuses what an earlier attempt left.
    (stale / "items").mkdir(parents=True)
    (stale / "items" / "old.csv").write_bytes(b"x")
    with factory.open("run_stale") as workspace:
        assert list(workspace.items.iterdir()) == []


@needs_root
def test_as_root_each_run_gets_its_own_size_capped_tmpfs(tmp_path: Path) -> None:
    factory = WorkspaceFactory(tmp_path / "ws", mount_tmpfs=True, size_mb=16)
    if not factory.mounts_tmpfs:
        pytest.skip("mount(8) is not available")
    with factory.open("run_abc") as workspace:
        if not workspace.mounted:
            pytest.skip("this container may not mount tmpfs")
        assert mounted(workspace.root)
        options = subprocess.run(
            ["findmnt", "-n", "-o", "FSTYPE,OPTIONS", str(workspace.root)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        assert options.startswith("tmpfs") and "nosuid" in options and "nodev" in options
        assert stat.S_IMODE(workspace.root.stat().st_mode) == 0o700
        # The cap holds: writing past it fails with ENOSPC instead of eating the host's memory.
        with pytest.raises(OSError) as full, (workspace.items / "big").open("wb") as sink:
            sink.write(b"\0" * (17 * 1024 * 1024))
            sink.flush()
            os.fsync(sink.fileno())
        assert full.value.errno == 28
    assert not workspace.root.exists() and not mounted(workspace.root)


@needs_root
def test_sweep_unmounts_a_tmpfs_a_killed_runner_left(tmp_path: Path) -> None:
    factory = WorkspaceFactory(tmp_path / "ws", mount_tmpfs=True, size_mb=16)
    stale = factory.root / "run_stale"
    stale.mkdir(parents=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(stale)], check=False).returncode:
        pytest.skip("this container may not mount tmpfs")
    (stale / "secret").write_bytes(b"x")
    assert factory.sweep() == 1
    assert not stale.exists() and not mounted(stale)


@pytest.mark.moto_server
@pytest.mark.parametrize("mount_tmpfs", [False, pytest.param(True, marks=needs_root)])
@pytest.mark.parametrize("fail", [False, True])
def test_run_workspace_holds_plaintext_only_during_the_run(
    store: Store, tmp_path: Path, mount_tmpfs: bool, fail: bool
) -> None:
    observed: dict[str, Any] = {}

    def look(inputs: Any) -> None:
        observed["root"] = inputs.workspace
        observed["mounted"] = mounted(inputs.workspace)
        observed["items"] = sorted(path.name for path in (inputs.workspace / "items").iterdir())

    pipeline = FakePipeline(store=store, during=look, error_code="output_denied" if fail else None)
    runner = make_runner(store, tmp_path / "runner", pipeline, mount_tmpfs=mount_tmpfs)
    owner = Tenant.create(store, "owner")
    scope = upload_agent(store, owner, write_agent_dir(tmp_path / "scope"))
    query = upload_agent(store, owner, write_agent_dir(tmp_path / "query"))
    manifest = build_manifest(
        owner,
        room_id="room_ws",
        scope=agent_ref(scope),
        query=agent_ref(query),
        compose_hashes=[TEST_COMPOSE_HASH],
    )
    room = create_room(store, owner, manifest)
    seal_item(store, room, b"secret,1\n")
    submitted = submit_run(store, room, runner_keys=runner.keys.hpke_public_keys)
    runner.lifecycle.execute(submitted.run_id, receive_count=1)

    expected = RunStatus.FAILED if fail else RunStatus.COMPLETED
    assert store.runs.require(submitted.run_id).status is expected
    assert observed["items"] == ["item-0"]
    assert observed["root"].parent == runner.workspaces.root
    if mount_tmpfs and runner.workspaces.mounts_tmpfs:
        assert observed["mounted"]
    assert not observed["root"].exists()
    assert list(runner.workspaces.root.iterdir()) == []
