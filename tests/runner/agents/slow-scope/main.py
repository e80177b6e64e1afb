"""Test scope agent: thinks for 1.5 s, then answers with the fixed people policy (departments and
salaries, averages over 5 or more), so the stages after it have to wait."""

import time

from hivemind_agent import main

POLICY = {
    "tables": {"people": {"columns": ["department", "salary"]}},
    "aggregate": {"required": True, "min_group_size": 5, "functions": ["COUNT", "SUM", "AVG"]},
}


def decide(ctx):
    time.sleep(1.5)
    return POLICY


if __name__ == "__main__":
    main(decide)
