"""``metrics.jsonl``: one JSON record per logged step, and a final record with the evaluation."""
from __future__ import annotations

import json
import os
from typing import Any, Dict

__all__ = ["append", "truncate"]


def append(path: str, record: Dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate(path: str, step: int) -> None:
    """Cut the log of a run resumed at ``step`` (0: a fresh start) after the records of steps up to
    ``step``, so that the steps run again are logged once. The final record of a run that ended at
    ``step`` goes too (the resumed run writes its own), as does a line a crash left half-written."""
    if not os.path.exists(path):
        return
    keep = 0
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
                later = record["step"] > step or (record.get("final") and record["step"] == step)
            except (ValueError, TypeError, KeyError, AttributeError):
                break
            if later or not line.endswith(b"\n"):
                break
            keep += len(line)
    os.truncate(path, keep)
