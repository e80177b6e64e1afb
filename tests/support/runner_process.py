"""``python tests/support/runner_process.py``: the real runner entry point with a fake pipeline.

For tests that kill and restart a runner process. Configuration is the runner's own (``HIVEMIND_*``),
plus two files: while ``HIVEMIND_TEST_BLOCK_FILE`` exists, the pipeline holds every run after its first
stage, having written the run id to ``HIVEMIND_TEST_STARTED_FILE``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hivemind.store import Store
from hivemind_runner.__main__ import main
from hivemind_runner.config import RunnerSettings
from hivemind_runner.keys import RunnerKeys
from hivemind_runner.pipeline import PipelineInputs
from support.runner_harness import FakePipeline

BLOCK_FILE = Path(os.environ["HIVEMIND_TEST_BLOCK_FILE"])
STARTED_FILE = Path(os.environ["HIVEMIND_TEST_STARTED_FILE"])


def hold_while_blocked(inputs: PipelineInputs) -> None:
    STARTED_FILE.write_text(inputs.run_id)
    while BLOCK_FILE.exists():
        time.sleep(0.05)


def fake_pipeline(settings: RunnerSettings, keys: RunnerKeys, store: Store) -> FakePipeline:
    return FakePipeline(store=store, during=hold_while_blocked)


if __name__ == "__main__":
    sys.exit(main(pipeline_factory=fake_pipeline))
