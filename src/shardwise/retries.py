"""No blind retries: the Snakemake head does not resubmit a job whose failure recurs.

A job that fails for a reason a rerun meets again (shardwise.errors.recurs: bad config or input, a
model that cannot load, data of the wrong type, CUDA out of memory at the same batch size) leaves
`<its log>.no-retry.json` with the cause (shardwise.smk.rule_main). `install(workflow)` makes
Snakemake's retry count of such a job 0, so it runs once and fails with that one line; any other
failure (time limit, node failure, a killed worker, SIGTERM) keeps the profile's `retries` and the
longer runtime of the next attempt.

This replaces the `restart_times` property of snakemake.jobs.Job (the number of retries Snakemake's
scheduler reads when a job fails; checked against snakemake 9.x): with another Snakemake that lacks
it, `install` warns and changes nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from shardwise.smk import no_retry_path

_INSTALLED = "_shardwise_no_retry"


def recorded_cause(job: Any, since: float) -> str | None:
    """The cause a failed job recorded for not retrying it (written since `since`, this run's start),
    or None."""
    for log_file in getattr(job, "log", None) or ():
        path = no_retry_path(str(log_file))
        try:
            if path.stat().st_mtime < since:
                continue  # an earlier run's
            return str(json.loads(path.read_text()).get("cause") or "a failure that recurs")
        except (OSError, ValueError, AttributeError):
            continue
    return None


def install(since: float) -> bool:
    """Make Snakemake (in this process) not retry a job that recorded a recurring failure since
    `since`. Returns whether it could."""
    from snakemake.jobs import Job

    original = Job.__dict__.get("restart_times")
    if getattr(original, _INSTALLED, False):
        return True
    getter = original.fget if isinstance(original, property) else None
    if getter is None:
        print("shardwise: warning: no Job.restart_times in Snakemake; retries stay blind", file=sys.stderr)
        return False
    told: set[str] = set()

    def restart_times(self: Any) -> int:
        times = getter(self)
        if not times:
            return times
        cause = recorded_cause(self, since)
        if cause is None:
            return times
        key = str(Path(str(next(iter(self.log)))))
        if key not in told:
            told.add(key)
            print(f"shardwise: not retrying rule {self.rule.name} ({key}): {cause}", file=sys.stderr)
        return 0

    patched = property(restart_times)
    setattr(patched.fget, _INSTALLED, True)
    Job.restart_times = patched
    return True
