"""A record's task and the reward filter (AgentTuning keeps reward == 1, Mind2Web reward >= 2/3).

Task: the record's `task` field, else its `id` prefix (`os_12` → `os`), else the Hugging Face split it
came from, else the source's name. General (chat) records take their source's name as task.

Reward: a record without one passes (the released AgentInstruct is already filtered); a number is kept
when >= its task's threshold; anything else (a string, a bool, NaN) is a rejection.
"""

from __future__ import annotations

import math
import re

ID_PREFIX = re.compile(r"^(.+)_\d+$")
# A reward up to 1e-6 below its threshold passes: float noise (2/3 computed another way, 0.999999999 for 1)
# and 2/3 written with 6 or more decimals (0.666666). A reward rounded to fewer decimals passes only if it
# was rounded up (0.6667 is over 2/3 anyway); 0.6666 is filtered (set a lower threshold to keep it).
REWARD_TOLERANCE = 1e-6

REWARD_BELOW_THRESHOLD = "reward_below_threshold"
NON_NUMERIC_REWARD = "non_numeric_reward"
NON_STRING_TASK = "non_string_task"
TASK_FROM_SOURCE_NAME = "task_from_source_name"


def agent_task(record: dict, record_id: str | None, split: str | None, source: str) -> tuple[str | None, str | None]:
    """(task, repair) for an agent record; task None with a rejection reason as `repair` if `task` is bad."""
    task = record.get("task")
    if task is not None:
        if not isinstance(task, str) or not task.strip():
            return None, NON_STRING_TASK
        return task.strip(), None
    if record_id is not None and (m := ID_PREFIX.match(record_id)):
        return m[1], None
    if split:
        return split, None
    return source, TASK_FROM_SOURCE_NAME


def reward_verdict(record: dict, threshold: float) -> str | None:
    """None when the record passes, else the reason it is filtered or rejected."""
    reward = record.get("reward")
    if reward is None:
        return None
    if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
        return NON_NUMERIC_REWARD
    return None if reward >= threshold - REWARD_TOLERANCE else REWARD_BELOW_THRESHOLD
