"""`python -m snakemake`, with the slurm executor plugin's status checks at most CAP seconds apart.

snakemake-executor-plugin-slurm 2.8.0 waits 10 s longer after each status check (sacct) in which no
job completed, up to 180 s; a failed, timed-out or cancelled job does not count as completed. That
spares a shared slurmdbd, but in these tests a job that ends 2 minutes in is seen up to a minute
late, and each retry after a failure waits 10, 20, 30 s more. The tests that run Snakemake with the
plugin (tests/test_slurm.py, the fake-sbatch runs of tests/test_profile.py) start it through this
file: only the wait between status checks changes; the sbatch lines, the states sacct reports and
what the plugin and Snakemake do with them are theirs."""

from __future__ import annotations

import sys

from snakemake.cli import main
from snakemake_executor_plugin_slurm import Executor

CAP = 3  # seconds; the plugin starts at slurm-init-seconds-before-status-checks (2 in the tests)

_sleep = Executor.sleep


async def _capped_sleep(self: Executor) -> None:
    wait = self.next_seconds_between_status_checks
    if wait is not None and wait > CAP:
        self.next_seconds_between_status_checks = CAP
    await _sleep(self)


Executor.sleep = _capped_sleep  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.argv[0] = "snakemake"
    sys.exit(main())
