"""`shardwise status` on canned input: sacct output, shard status files, finished shards' records."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from shardwise.config import ShardSpec
from shardwise.shards.plan import ShardPlan
from shardwise.shards.store import write_plan_file
from shardwise.status import (
    SBU_PER_GPU_HOUR,
    RunStatus,
    ShardState,
    parse_sacct,
    progress,
    render,
    shard_state,
    slurm_cause,
)

pytestmark = pytest.mark.unit

SACCT = """\
4101|RUNNING
4102|TIMEOUT
4103|CANCELLED by 1000
4104|OUT_OF_MEMORY
4105|NODE_FAIL
4106|PREEMPTED
4107|PENDING
4108|FAILED
4109|COMPLETED

"""


def plan(tmp_path: Path, n_items: int = 100, n_shards: int = 4, gpus: int = 1, stage: str = "generate"):
    spec = ShardSpec(n_shards=n_shards, shards_per_job=2, gpus_per_shard=gpus, chunk_size=5)
    return ShardPlan(
        stage=stage,
        key="run",
        n_items=n_items,
        spec=spec,
        identity={"x": 1},
        root=tmp_path / "results" / stage / "run",
        log_dir=tmp_path / "logs" / stage / "run",
        ext="parquet",
    )


def test_sacct_output_is_parsed_with_the_states_detail():
    states = parse_sacct(SACCT)
    assert states["4103"] == "CANCELLED by 1000" and states["4102"] == "TIMEOUT"
    assert len(states) == 9


@pytest.mark.parametrize(
    ("state", "says"),
    [
        ("TIMEOUT", "time limit"),
        ("CANCELLED by 1000", "cancelled"),
        ("OUT_OF_MEMORY", "out of memory"),
        ("NODE_FAIL", "node failed"),
        ("PREEMPTED", "preempted"),
        ("FAILED", "non-zero"),
    ],
)
def test_an_ended_job_gives_its_shards_a_cause(tmp_path, state, says):
    p = plan(tmp_path)
    p.store.mkdir(parents=True)
    status = {"state": "running", "pid": 1, "host": "gcn12", "slurm_job_id": "4102"}
    p.status_path(1).write_text(json.dumps(status))
    shard = shard_state(p, 1, {"4102": state})
    assert shard.state == "failed"
    assert f"SLURM job {state}" in shard.detail and says in shard.detail


@pytest.mark.parametrize("state", ["RUNNING", "PENDING", "REQUEUED", "COMPLETING", None])
def test_a_living_job_keeps_its_shards_running(tmp_path, state):
    assert slurm_cause(state) is None
    p = plan(tmp_path)
    p.store.mkdir(parents=True)
    status = {"state": "running", "pid": 1, "host": "gcn12", "slurm_job_id": "4101"}
    p.status_path(0).write_text(json.dumps(status))
    assert shard_state(p, 0, {"4101": state} if state else {}).state == "running"


def test_siblings_of_a_cancelled_job_are_described_alike(tmp_path):
    """One worker wrote 'terminated by SIGTERM', its sibling died before writing: both get the
    job's state."""
    p = plan(tmp_path)
    p.store.mkdir(parents=True)
    sigterm = "ShardError: terminated by signal SIGTERM (time limit, scancel, Ctrl-C?)"
    p.status_path(0).write_text(
        json.dumps({"state": "failed", "pid": 1, "host": "gcn1", "slurm_job_id": "4103", "error": sigterm})
    )
    sibling = {"state": "running", "pid": 2, "host": "gcn1", "slurm_job_id": "4103"}
    p.status_path(1).write_text(json.dumps(sibling))
    details = [shard_state(p, i, parse_sacct(SACCT)).detail for i in (0, 1)]
    assert all(d.startswith("SLURM job CANCELLED by 1000: the job was cancelled") for d in details)


def test_a_dead_local_worker_is_failed_without_sacct(tmp_path):
    p = plan(tmp_path)
    p.store.mkdir(parents=True)
    gone = {"state": "running", "pid": 2**22 + 17, "host": socket.gethostname()}  # above pid_max
    p.status_path(2).write_text(json.dumps(gone))
    shard = shard_state(p, 2, {})
    assert shard.state == "failed" and "died without a word" in shard.detail


def record(rows: range, seconds: float, tokens_per_s: float) -> dict:
    stats = {"tokens_per_s": tokens_per_s}
    return {"n_rows": len(rows), "start": 1000.0, "end": 1000.0 + seconds, "stats": stats}


def test_eta_and_sbu_from_the_finished_shards(tmp_path):
    p = plan(tmp_path)  # 100 items in 4 shards of 25 (chunks of 5), 1 GPU each
    ranges = p.ranges()
    run = RunStatus(
        p,
        [
            ShardState(0, "done", record=record(ranges[0], 3600.0, 40.0)),
            ShardState(1, "done", record=record(ranges[1], 3600.0, 60.0)),
            ShardState(2, "running"),
            ShardState(3, "pending"),
        ],
    )
    got = progress(run)
    assert got is not None
    assert got.items_per_s == pytest.approx(50 / 7200)  # per worker
    assert got.tokens_per_s == pytest.approx(50.0)
    assert got.remaining_items == 50 and got.workers == 1
    assert got.eta_s == pytest.approx(50 / (50 / 7200))  # 2 h at one worker
    assert got.gpu_hours_spent == pytest.approx(2.0) and got.gpu_hours_left == pytest.approx(2.0)
    assert got.sbu_spent == pytest.approx(2 * SBU_PER_GPU_HOUR)
    assert got.sbu_projected == pytest.approx(4 * SBU_PER_GPU_HOUR)
    shown = render([run])
    assert "50.0 new tokens/s per worker" in shown
    assert "ETA: 2.0 h for 50 items at 1 worker(s)" in shown
    assert f"cost: {2 * SBU_PER_GPU_HOUR} SBU spent, {4 * SBU_PER_GPU_HOUR} SBU projected" in shown


def test_every_stage_shows_tokens_per_second_and_cpu_stages_no_sbu(tmp_path):
    for stage in ("teacher_logits", "activations", "score_fluency"):
        p = plan(tmp_path, gpus=0, stage=stage)
        ranges = p.ranges()
        run = RunStatus(p, [ShardState(i, "done", record=record(ranges[i], 10.0, 123.4)) for i in range(4)])
        shown = render([run])
        assert "123.4 tokens/s per worker" in shown and "ETA" not in shown and "SBU" not in shown


def test_a_status_of_many_shards_cuts_each_plan_once(tmp_path, monkeypatch):
    """Every shard asks for its row range; the plan cuts them once (it was once per shard:
    quadratic in shards, 17 s for 9 x 1,024 shards)."""
    import shardwise.shards.plan as shards
    from shardwise.status import collect

    p = plan(tmp_path, n_items=5000, n_shards=500)
    write_plan_file(p)
    calls = []
    cut = shards.shard_ranges
    monkeypatch.setattr(shards, "shard_ranges", lambda *a, **k: calls.append(a) or cut(*a, **k))
    (run,) = collect(tmp_path / "results")
    assert len(run.shards) == 500 and all(s.state == "pending" for s in run.shards)
    render([run])
    assert len(calls) == 1


def failed_and_running(tmp_path: Path) -> ShardPlan:
    p = plan(tmp_path)
    write_plan_file(p)
    failed = {"state": "failed", "pid": 1, "host": "gcn1", "error": "InputError: bad prompt"}
    p.status_path(0).write_text(json.dumps(failed))
    running = {"state": "running", "pid": 2, "host": "gcn1", "slurm_job_id": "4101"}
    p.status_path(1).write_text(json.dumps(running))
    return p


def test_status_exits_2_with_a_failed_shard_and_0_while_running(tmp_path, capsys, monkeypatch):
    from shardwise.cli import main

    # the running shard's SLURM job is alive (sacct stand-in)
    monkeypatch.setattr("shardwise.status.slurm_states", lambda ids: {i: "RUNNING" for i in ids})
    p = failed_and_running(tmp_path)
    results = str(tmp_path / "results")
    assert main(["status", "--results", results]) == 2
    out = capsys.readouterr().out
    assert "shard 0: failed: InputError: bad prompt" in out and "1 shard(s) failed" in out
    assert main(["status", "--results", results, "--json"]) == 2
    got = json.loads(capsys.readouterr().out)
    (stage,) = got["stages"]
    assert got["failed_shards"] == 1 and stage["name"] == "generate/run" and stage["state"] == "failed"
    assert stage["counts"] == {"done": 0, "running": 1, "failed": 1, "pending": 2}
    assert [s["state"] for s in stage["shards"]] == ["failed", "running"]

    p.status_path(0).unlink()  # only running and pending: not a failure
    assert main(["status", "--results", results, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"][0]["state"] == "running"


def test_status_of_a_path_with_no_run_is_an_error(tmp_path, capsys):
    from shardwise.cli import main

    assert main(["status", "--results", str(tmp_path / "reslts")]) == 1
    assert "reslts: no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["status", "--results", str(tmp_path / "empty")]) == 1
    assert "holds no shardwise run" in capsys.readouterr().err


def test_status_lists_every_stage_of_the_config(tmp_path, capsys, monkeypatch):
    """The demo config's sharded stages: those not started are pending (they were left out before)."""
    import yaml

    from shardwise.cli import main

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)  # the demo config's relative paths
    (tmp_path / "results").mkdir()
    assert main(["status", "--results", str(tmp_path / "results"), "--config", "config/config.yaml"]) == 0
    out = capsys.readouterr().out
    cfg = yaml.safe_load((repo / "config/config.yaml").read_text())
    for run in cfg["generate"]["models"]:
        n = cfg["generate"]["shards"]["n_shards"]
        assert f"generate/{run}: {n} shards (0 done, 0 running, 0 failed, {n} pending), not started" in out
    assert "teacher_logits/" in out and "activations/labelled/" in out and "score_fluency/" in out


def test_billed_against_used_per_stage(tmp_path, monkeypatch, capsys):
    """Two node jobs of 2 GPUs each, 1 h elapsed each (4 GPU-h billed); their 4 shards computed
    0.5 h each on 1 GPU (2 GPU-h): half of it."""
    from shardwise.cli import main
    from shardwise.status import parse_sacct_usage

    usage = parse_sacct_usage(
        "7|3600|billing=36,cpu=36,gres/gpu:a100=2,gres/gpu=2,mem=240G,node=1\n8|3600|cpu=36,gres/gpu=2\n"
    )
    assert usage == {"7": (3600.0, 36, 2), "8": (3600.0, 36, 2)}
    monkeypatch.setattr("shardwise.status.slurm_usage", lambda ids: {i: usage[i] for i in ids if i in usage})
    p = plan(tmp_path)  # 4 shards, 2 per job, 1 GPU each
    write_plan_file(p)
    for i in range(4):
        rows = p.ranges()[i]
        done = {**record(rows, 1800.0, 10.0), "slurm_job_id": "7" if i < 2 else "8", "index": i}
        monkeypatch.setattr(ShardPlan, "is_done", lambda self, i, checksum=False: True)
        p.record_path(i).parent.mkdir(parents=True, exist_ok=True)
        p.record_path(i).write_text(json.dumps(done))
    assert main(["status", "--results", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    billed = "billed: 4.00 GPU-h in 2 SLURM job(s) (elapsed x allocated); "
    assert billed + "the shards computed 2.00 GPU-h of it (50 %)" in out
    assert main(["status", "--results", str(tmp_path / "results"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["stages"][0]["billing"]
    assert got == {"unit": "GPU-h", "jobs": 2, "billed": 4.0, "used": 2.0}
