"""One synth of the stack for the whole session (a synth takes seconds: jsii starts a Node.js runtime).

``synthesized`` builds the production environment of cdk.json with a few overrides that exercise the
optional branches (trusted runner principal with an external id, alarm e-mail) and a unique prefix,
so the moto deployment test never collides with another deployment on the shared moto server. The
dependency layer is a stand-in directory: what is in it does not change the template.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra-cdk"
if str(INFRA) not in sys.path:
    sys.path.insert(0, str(INFRA))

from hivemind_infra.config import CONTEXT_KEY, EnvironmentConfig, cdk_json_context  # noqa: E402

RUNNER_PRINCIPAL = "arn:aws:iam::123456789012:user/hivemind-runner-base"
RUNNER_EXTERNAL_ID = "hivemind-runner-test-external-id"
ALARM_EMAIL = "ops@example.com"


@dataclass(frozen=True)
class Synthesized:
    config: EnvironmentConfig
    stack: Any  # HivemindStack
    template: dict[str, Any]
    messages: list[tuple[str, str, str]]  # (level, construct path, text)
    nag_report: list[dict[str, str]]
    outdir: Path

    def resources(self, resource_type: str) -> dict[str, dict[str, Any]]:
        return {
            logical_id: resource
            for logical_id, resource in self.template["Resources"].items()
            if resource["Type"] == resource_type
        }

    def logical_id(self, construct: Any) -> str:
        return self.stack.resolve(self.stack.get_logical_id(construct.node.default_child))


def context_for_tests() -> dict[str, Any]:
    context = cdk_json_context()
    prod = dict(context[CONTEXT_KEY]["prod"])
    prod.update(
        prefix=f"cdk{uuid.uuid4().hex[:10]}",
        runner_trusted_principals=[RUNNER_PRINCIPAL],
        runner_external_id=RUNNER_EXTERNAL_ID,
        alarm_email=ALARM_EMAIL,
    )
    return {**context, CONTEXT_KEY: {"test": prod}}


@pytest.fixture(scope="session")
def synthesized(tmp_path_factory: pytest.TempPathFactory) -> Synthesized:
    # Imported here: loading aws_cdk starts jsii (seconds), and only the synth tests need it.
    from hivemind_infra.functions import AssetPaths  # noqa: PLC0415
    from hivemind_infra.stack import build_app  # noqa: PLC0415

    deps = tmp_path_factory.mktemp("deps-layer")
    (deps / "python").mkdir()
    (deps / "python" / "README").write_text("stand-in for build/layers/deps in tests\n")
    outdir = tmp_path_factory.mktemp("cdk.out")
    assets = AssetPaths(functions=REPO / "functions", core_layer=REPO / "layers" / "core", deps_layer=deps)
    app, stacks = build_app(context=context_for_tests(), assets=assets, outdir=str(outdir))
    stack = stacks["test"]
    assembly = app.synth()
    artifact = assembly.get_stack_artifact(stack.artifact_id)
    template = json.loads((outdir / artifact.template_file).read_text())
    messages = [
        (str(message.level.value), message.id, str(message.entry.data)) for message in artifact.messages
    ]
    [report] = outdir.glob(f"AwsSolutions-*{stack.stack_name}-NagReport.csv")
    with report.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return Synthesized(
        config=stack.config,
        stack=stack,
        template=template,
        messages=messages,
        nag_report=rows,
        outdir=outdir,
    )
