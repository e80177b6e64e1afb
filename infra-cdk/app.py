"""Synthesize every environment of cdk.json into cdk.out/, offline (no AWS access, no cdk CLI needed).

    python infra-cdk/app.py                    # all environments
    python infra-cdk/app.py --only dev         # one of them
    cdk synth / cdk deploy hivemind-dev        # the CDK CLI runs this file too (see cdk.json "app")

Exits non-zero when cdk-nag's AwsSolutions pack reports an unsuppressed error, or when the dependency
layer has not been built (``make layers``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Node.js 20 is what the build machines have; jsii would otherwise print a banner on every run.
os.environ.setdefault("JSII_SILENCE_WARNING_DEPRECATED_NODE_VERSION", "1")
os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from hivemind_infra.config import ConfigError, cdk_json_context  # noqa: E402
from hivemind_infra.functions import AssetPaths  # noqa: E402
from hivemind_infra.stack import build_app  # noqa: E402

ASSETS = AssetPaths(
    functions=REPO / "functions",
    core_layer=REPO / "layers" / "core",
    deps_layer=REPO / "build" / "layers" / "deps",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="environment to synthesize (repeatable)")
    parser.add_argument("--outdir", default=None, help="cloud assembly directory (default: cdk.out)")
    args = parser.parse_args(argv)
    # Under the cdk CLI, CDK_OUTDIR is set and wins; run directly, write next to this file.
    outdir = args.outdir or os.environ.get("CDK_OUTDIR") or str(HERE / "cdk.out")
    try:
        app, _ = build_app(context=cdk_json_context(), assets=ASSETS, outdir=outdir, only=tuple(args.only))
    except (ConfigError, FileNotFoundError) as exc:
        print(f"synth: {exc}", file=sys.stderr)
        return 2
    assembly = app.synth()
    errors = [
        f"{stack.stack_name}: {message.id}: {message.entry.data}"
        for stack in assembly.stacks
        for message in stack.messages
        if message.level == "error"
    ]
    for line in errors:
        print(f"synth: {line}", file=sys.stderr)
    if errors:
        return 1
    for stack in assembly.stacks:
        print(f"synth: {stack.stack_name} -> {Path(assembly.directory) / stack.template_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
