"""The pipeline's deterministic pieces, without a sandbox: the output gate, stage failure codes and the
socket directory check."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from hivemind.models import Stage
from hivemind.policy import parse_policy
from hivemind_runner.bridge import ArtifactStore, BridgeLimits, StageOutput
from hivemind_runner.llm import LlmConfig, LlmGateway
from hivemind_runner.pipeline import Pipeline, PipelineConfig, RunFailed, gate_output, stage_answer
from hivemind_runner.sandbox import Outcome, SandboxError

RULES = parse_policy({"output": {"deny": [r"(?i)\bsecret\b"], "redact": [r"\d{3}-\d{4}", "Alice"]}})
NO_RULES = parse_policy({})


def text(value: str) -> StageOutput:
    return StageOutput(kind="text", text=value)


def data(value: dict) -> StageOutput:
    return StageOutput(kind="json", data=value)


# --- the output gate ------------------------------------------------------------------------------------


def test_text_answers_are_redacted() -> None:
    gated = gate_output(RULES, text("Call Alice at 555-1234."))
    assert gated.output == b"Call [REDACTED] at [REDACTED]."
    assert gated.content_type == "text/plain; charset=utf-8"


@pytest.mark.parametrize(
    "answer",
    [
        text("the SECRET is out"),
        data({"note": "a secret"}),
        data({"secret": 1}),
        data({"rows": [["x", {"deep": "Secret"}]]}),
        data({"multi": "line\nsecret\n"}),
    ],
    ids=["text", "json-value", "json-key", "nested", "escaped-newline"],
)
def test_a_deny_match_anywhere_refuses_the_output(answer: StageOutput) -> None:
    with pytest.raises(RunFailed) as refused:
        gate_output(RULES, answer)
    assert refused.value.code == "output_denied"


def test_json_answers_are_redacted_leaf_by_leaf() -> None:
    gated = gate_output(
        RULES, data({"Alice": "555-1234", "phone": 5551234, "n": 3, "ok": True, "none": None})
    )
    assert gated.content_type == "application/json"
    assert json.loads(gated.output) == {
        "[REDACTED]": "[REDACTED]",
        "phone": 5551234,
        "n": 3,
        "ok": True,
        "none": None,
    }
    numbers = parse_policy({"output": {"redact": [r"\d{5,}"]}})
    assert json.loads(gate_output(numbers, data({"salary": 65143, "n": 8})).output) == {
        "salary": "[REDACTED]",
        "n": 8,
    }


def test_a_refusal_passes_the_same_gate() -> None:
    with pytest.raises(RunFailed, match="output_denied"):
        gate_output(RULES, data({"refusal": "that would reveal the secret"}))
    assert json.loads(gate_output(RULES, data({"refusal": "no names"})).output) == {"refusal": "no names"}


def store(tmp_path: Path, files: dict[str, bytes]) -> ArtifactStore:
    artifacts = ArtifactStore(tmp_path / "artifacts", BridgeLimits())
    for name, content in files.items():
        artifacts.put(name, content, "application/octet-stream")
    return artifacts


def test_text_artifacts_are_checked_and_redacted(tmp_path: Path) -> None:
    artifacts = store(tmp_path, {"report.csv": b"name,phone\nAlice,555-1234\n"})
    gated = gate_output(RULES, text("see the report"), artifacts.stored)
    assert gated.artifacts["report.csv"].read_bytes() == b"name,phone\n[REDACTED],[REDACTED]\n"
    leaking = store(tmp_path / "second", {"leak.txt": b"the secret list"})
    with pytest.raises(RunFailed, match="output_denied"):
        gate_output(RULES, text("fine"), leaking.stored)


def test_binary_artifacts_leave_only_without_output_rules(tmp_path: Path) -> None:
    artifacts = store(tmp_path, {"chart.png": b"\x89PNG\r\n\x1a\n\xff\xfe"})
    with pytest.raises(RunFailed, match="artifact_unverifiable"):
        gate_output(RULES, text("fine"), artifacts.stored)
    gated = gate_output(NO_RULES, text("fine"), artifacts.stored)
    assert list(gated.artifacts) == ["chart.png"]


# --- stage outcomes -------------------------------------------------------------------------------------


def test_an_accepted_answer_counts_whatever_the_sandbox_did_next() -> None:
    answer = text("42")
    for outcome in Outcome:
        assert stage_answer(Stage.QUERY, answer, outcome) is answer


@pytest.mark.parametrize(
    ("output", "outcome", "code"),
    [
        (
            StageOutput(kind="error", error_code="agent_error", error_message="x"),
            Outcome.FAILED,
            "query_failed",
        ),
        (
            StageOutput(kind="error", error_code="budget_exceeded", error_message=""),
            Outcome.OK,
            "query_budget_exceeded",
        ),
        (
            StageOutput(kind="error", error_code="secretname_alice", error_message=""),
            Outcome.OK,
            "query_failed",
        ),
        (None, Outcome.TIMEOUT, "query_timeout"),
        (None, Outcome.OOM, "query_out_of_memory"),
        (None, Outcome.OK, "query_failed"),
        (None, Outcome.KILLED, "query_failed"),
        (None, Outcome.OUTPUT_TRUNCATED, "query_failed"),
    ],
)
def test_failure_codes_come_from_a_closed_set(
    output: StageOutput | None, outcome: Outcome, code: str
) -> None:
    with pytest.raises(RunFailed) as failed:
        stage_answer(Stage.QUERY, output, outcome)
    assert failed.value.code == code


# --- the socket directory ---------------------------------------------------------------------------------


def pipeline(socket_root: Path) -> Pipeline:
    # The socket directory check needs no backend or image cache.
    return Pipeline(None, None, LlmGateway(LlmConfig()), config=PipelineConfig(socket_root=socket_root))  # type: ignore[arg-type]


def test_the_socket_root_is_created_closed_to_other_writers(tmp_path: Path) -> None:
    root = pipeline(tmp_path / "bridges").socket_root()
    assert root.stat().st_mode & 0o777 == 0o711


@pytest.mark.parametrize("mode", [0o777, 0o733, 0o1777])
def test_a_socket_root_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    root = tmp_path / "bridges"
    root.mkdir()
    root.chmod(mode)
    with pytest.raises(SandboxError, match="closed to other writers"):
        pipeline(root).socket_root()


def test_a_socket_root_owned_by_someone_else_or_a_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "real"
    target.mkdir(mode=0o711)
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(SandboxError):
        pipeline(link).socket_root()
    if os.geteuid() == 0:
        os.chown(target, 12345, 12345)
        with pytest.raises(SandboxError):
            pipeline(target).socket_root()
