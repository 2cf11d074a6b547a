"""The shard mechanism with a model-free stage: ranges, fingerprints, the runner, resume, merge."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardwise.config import ShardSpec
from shardwise.errors import ShardError
from shardwise.shards.codecs import ParquetCodec
from shardwise.shards.plan import ShardPlan, chunk_ranges, shard_ranges
from shardwise.shards.runner import run_job
from shardwise.shards.store import verify
from shardwise.shards.worker import ShardContext
from shardwise.status import collect, render

TESTS = Path(__file__).resolve().parent


def compute_double(ctx: ShardContext) -> None:
    """A stage: value = 2 x row; logs every chunk it computes; can fail or die on request."""
    a = ctx.args
    for chunk in ctx.pending_chunks():
        with open(a["trace"], "a") as fh:
            fh.write(f"{ctx.index} {chunk.start} {chunk.stop}\n")
        if ctx.index == a.get("fail_shard"):
            raise RuntimeError(f"boom in shard {ctx.index}")
        marker = Path(a.get("died_marker", "/nonexistent"))
        if ctx.index == a.get("die_shard") and chunk.start >= a["die_at"] and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        ctx.commit(chunk, pd.DataFrame({"row": list(chunk), "value": [2 * r for r in chunk]}))
    while a.get("hang"):  # a shard that never ends (until a signal stops it)
        time.sleep(0.1)


def make_plan(tmp_path: Path, n_items: int = 20, n_shards: int = 3, shards_per_job: int = 3, **identity):
    spec = ShardSpec(n_shards=n_shards, shards_per_job=shards_per_job, gpus_per_shard=0, chunk_size=3)
    return ShardPlan(
        stage="double",
        key="k",
        n_items=n_items,
        spec=spec,
        identity={"input": "abc", **identity},
        root=tmp_path / "results" / "double" / "k",
        log_dir=tmp_path / "logs" / "double" / "k",
        ext="parquet",
    )


@pytest.fixture(autouse=True)
def _workers_import_this_module(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(TESTS))


def run(plan, tmp_path, job=0, **args):
    args = {"trace": str(tmp_path / "trace.txt"), **args}
    manifest = tmp_path / "results" / "double" / "k" / "jobs" / f"job-{job:04d}.json"
    return run_job(plan, job, compute_double, ParquetCodec(), args, manifest, threads=2), manifest


def traced(tmp_path) -> list[tuple[int, int, int]]:
    path = tmp_path / "trace.txt"
    if not path.exists():
        return []
    return [tuple(map(int, line.split())) for line in path.read_text().splitlines()]


def mtimes(plan: ShardPlan, indices) -> dict[int, int]:
    return {i: plan.shard_path(i).stat().st_mtime_ns for i in indices}


@pytest.mark.unit
@given(st.integers(min_value=1, max_value=500), st.integers(min_value=1, max_value=64))
def test_shard_ranges_cover_items_once_and_are_balanced(n_items, n_shards):
    ranges = shard_ranges(n_items, n_shards)
    assert len(ranges) == n_shards
    assert [r for rng in ranges for r in rng] == list(range(n_items))
    assert max(map(len, ranges)) - min(map(len, ranges)) <= 1
    assert ranges == shard_ranges(n_items, n_shards)


@pytest.mark.unit
@given(
    st.integers(min_value=1, max_value=500),
    st.integers(min_value=1, max_value=16),
    st.integers(min_value=1, max_value=40),
)
def test_aligned_shard_ranges_cut_only_at_block_boundaries(n_items, n_shards, align):
    if n_shards > -(-n_items // align):
        return
    ranges = shard_ranges(n_items, n_shards, align)
    assert [r for rng in ranges for r in rng] == list(range(n_items))
    assert all(len(r) > 0 and r.start % align == 0 for r in ranges)
    blocks = [-(-len(r) // align) for r in ranges]
    assert max(blocks) - min(blocks) <= 1


@pytest.mark.unit
def test_chunks_tile_a_shard():
    assert chunk_ranges(range(5, 12), 3) == [range(5, 8), range(8, 11), range(11, 12)]


@pytest.mark.unit
def test_parquet_parts_are_joined_one_at_a_time_with_their_schemas_unified(tmp_path):
    """The join of chunks into a shard and of shards into a run: one part read at a time (a row
    group each), a column all None in one part (type null) and one missing from a part unified."""
    import pyarrow.parquet as pq

    frames = [
        pd.DataFrame({"row": [0, 1], "extra": [None, None]}),
        pd.DataFrame({"row": [2], "extra": ["b"], "more": [1.5]}),
        pd.DataFrame({"row": [3, 4, 5], "extra": ["c", None, "e"]}),
    ]
    parts = []
    for i, frame in enumerate(frames):
        parts.append(tmp_path / f"{i}.parquet")
        ParquetCodec().write(frame, parts[-1])
    ParquetCodec().combine(parts, tmp_path / "out.parquet")
    out = pq.ParquetFile(tmp_path / "out.parquet")
    assert out.metadata.num_row_groups == 3
    merged = out.read().to_pandas()
    assert list(merged.columns) == ["row", "extra", "more"]
    assert list(merged.row) == list(range(6))
    assert merged.extra.tolist()[2:4] == ["b", "c"] and merged.extra.isna().tolist() == [1, 1, 0, 0, 1, 0]
    assert merged.more.isna().sum() == 5 and merged.more[2] == 1.5


@pytest.mark.unit
def test_fingerprint_depends_on_content_not_on_packing(tmp_path):
    base = make_plan(tmp_path)
    assert make_plan(tmp_path).fingerprint == base.fingerprint
    assert make_plan(tmp_path, n_shards=4).fingerprint != base.fingerprint
    assert make_plan(tmp_path, n_items=21).fingerprint != base.fingerprint
    assert make_plan(tmp_path, model="other").fingerprint != base.fingerprint
    repacked = replace(base, spec=replace(base.spec, shards_per_job=1, chunk_size=7))
    assert repacked.fingerprint == base.fingerprint
    assert len({base.shard_fingerprint(i) for i in range(3)}) == 3


@pytest.mark.unit
def test_plan_refuses_more_shards_than_items(tmp_path):
    with pytest.raises(ShardError, match=r"n_shards \(3\) exceeds the number of items \(2\)"):
        make_plan(tmp_path, n_items=2)


@pytest.mark.unit
def test_job_runs_its_shards_and_merge_verifies_them(tmp_path):
    plan = make_plan(tmp_path)
    manifest, path = run(plan, tmp_path)
    assert [s["index"] for s in manifest["shards"]] == [0, 1, 2]
    assert [s["rows"] for s in manifest["shards"]] == [[0, 7], [7, 14], [14, 20]]
    files = verify(plan, [path])
    merged = pd.concat([pd.read_parquet(f) for f in files])
    assert list(merged.row) == list(range(20))
    assert list(merged.value) == [2 * r for r in range(20)]
    record = json.loads(plan.record_path(1).read_text())
    assert record["fingerprint"] == plan.shard_fingerprint(1)
    assert record["n_rows"] == 7 and record["host"] and record["pid"] != os.getpid()
    assert record["cuda_visible_devices"] == ""
    assert not plan.parts_dir(1).exists()
    assert "shard 1 of double/k" in plan.log_path(1).read_text()


@pytest.mark.unit
def test_rerun_skips_done_shards(tmp_path):
    plan = make_plan(tmp_path)
    run(plan, tmp_path)
    before = mtimes(plan, range(3))
    n_traced = len(traced(tmp_path))
    run(plan, tmp_path)
    assert mtimes(plan, range(3)) == before
    assert len(traced(tmp_path)) == n_traced


@pytest.mark.integration
def test_failed_worker_names_its_shard_and_others_finish(tmp_path):
    plan = make_plan(tmp_path)
    with pytest.raises(ShardError) as err:
        run(plan, tmp_path, fail_shard=1)
    message = str(err.value)
    assert "1 of 3 worker(s) failed: shard 1" in message and str(plan.log_path(1)) in message
    assert plan.is_done(0) and plan.is_done(2) and not plan.is_done(1)
    assert "RuntimeError: boom in shard 1" in plan.log_path(1).read_text()
    status = json.loads(plan.status_path(1).read_text())
    assert status["state"] == "failed" and "boom" in status["error"]
    shown = render(collect(tmp_path / "results"))
    assert "1 failed" in shown and "boom in shard 1" in shown

    done = mtimes(plan, [0, 2])
    run(plan, tmp_path)
    assert mtimes(plan, [0, 2]) == done
    assert plan.is_done(1) and not plan.status_path(1).exists()
    assert "3 done" in render(collect(tmp_path / "results"))


@pytest.mark.integration
def test_killed_worker_resumes_from_its_last_committed_chunk(tmp_path):
    plan = make_plan(tmp_path)  # shard 1 = rows [7, 14): chunks at 7, 10, 13
    args = {"die_shard": 1, "die_at": 10, "died_marker": str(tmp_path / "died")}
    with pytest.raises(ShardError, match="shard 1"):
        run(plan, tmp_path, **args)
    shown = render(collect(tmp_path / "results"))
    assert "1 failed" in shown and "shard 1: failed: worker died without a word" in shown
    first = [t for t in traced(tmp_path) if t[0] == 1]
    assert first == [(1, 7, 10), (1, 10, 13)]  # chunk 7-10 committed, killed in 10-13
    done = mtimes(plan, [0, 2])
    run(plan, tmp_path, **args)
    second = [t for t in traced(tmp_path) if t[0] == 1][len(first) :]
    assert second == [(1, 10, 13), (1, 13, 14)]  # resumed after the committed chunk
    assert mtimes(plan, [0, 2]) == done
    merged = pd.concat(
        [pd.read_parquet(f) for f in verify(plan, [tmp_path / "results/double/k/jobs/job-0000.json"])]
    )
    assert list(merged.row) == list(range(20))


@pytest.fixture
def merged_run(tmp_path):
    plan = make_plan(tmp_path, n_shards=3, shards_per_job=1)
    manifests = [run(plan, tmp_path, job=j)[1] for j in range(3)]
    return plan, manifests


@pytest.mark.unit
def test_merge_refuses_a_stale_shard(tmp_path, merged_run):
    _plan, manifests = merged_run
    changed = make_plan(tmp_path, n_shards=3, shards_per_job=1, input="changed")
    with pytest.raises(ShardError, match="stale"):
        verify(changed, manifests)


@pytest.mark.unit
def test_merge_refuses_a_missing_row_range(merged_run):
    plan, manifests = merged_run
    with pytest.raises(ShardError, match=r"rows \[7, 14\) are covered by no shard"):
        verify(plan, [manifests[0], manifests[2]])
    with pytest.raises(ShardError, match=r"rows \[14, 20\) are covered by no shard"):
        verify(plan, manifests[:2])


@pytest.mark.unit
def test_merge_refuses_a_duplicated_row_range(merged_run):
    plan, manifests = merged_run
    with pytest.raises(ShardError, match=r"shard 1 .*duplicated row range"):
        verify(plan, [*manifests, manifests[1]])


@pytest.mark.unit
def test_merge_refuses_a_truncated_shard(merged_run):
    plan, manifests = merged_run
    path = plan.shard_path(2)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ShardError, match=r"shard 2 .*truncated or altered"):
        verify(plan, manifests)
    assert not plan.is_done(2)


@pytest.mark.unit
def test_merge_refuses_a_checksum_mismatch(merged_run):
    plan, manifests = merged_run
    path = plan.shard_path(0)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=r"shard 0 .* fails its sha256 checksum"):
        verify(plan, manifests)


@pytest.mark.unit
def test_merge_refuses_a_missing_shard_file(merged_run):
    plan, manifests = merged_run
    plan.shard_path(1).unlink()
    with pytest.raises(ShardError, match=r"shard 1 .*file missing"):
        verify(plan, manifests)


@pytest.mark.unit
def test_merge_names_every_bad_shard_at_once_and_takes_them_out_of_the_store(merged_run):
    plan, manifests = merged_run
    data = bytearray(plan.shard_path(0).read_bytes())
    data[len(data) // 2] ^= 0xFF
    plan.shard_path(0).write_bytes(bytes(data))
    plan.shard_path(1).unlink()
    with pytest.raises(ShardError) as err:
        verify(plan, manifests)
    message = str(err.value)
    assert "2 shard(s) failed verification" in message and "run the same command again" in message
    assert "shard 0 (0000-of-0003.parquet): fails its sha256" in message
    assert "shard 1 (0001-of-0003.parquet): file missing" in message
    assert not manifests[0].exists() and not manifests[1].exists() and manifests[2].exists()
    assert not plan.is_done(0) and not plan.is_done(1) and plan.is_done(2)  # pending again
    assert plan.shard_path(0).with_name("0000-of-0003.parquet.bad").read_bytes() == bytes(data)


def _flip_a_byte(path: Path) -> bytes:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return bytes(data)


@pytest.mark.unit
def test_is_done_only_reads_even_a_corrupt_shard(merged_run):
    """Asking whether a shard is done changes nothing: a shard that fails its checksum is not done,
    and its record and file stay where they are (it once moved them aside as a side effect)."""
    plan, _ = merged_run
    corrupt = _flip_a_byte(plan.shard_path(1))
    record = plan.record_path(1).read_text()
    assert plan.is_done(1) and not plan.is_done(1, checksum=True)
    assert plan.shard_path(1).read_bytes() == corrupt and plan.record_path(1).read_text() == record
    assert not plan.shard_path(1).with_name(plan.shard_path(1).name + ".bad").exists()


@pytest.mark.unit
def test_a_job_recomputes_a_corrupt_shard_and_keeps_it_aside(tmp_path, caplog):
    """A done shard whose file has its recorded size but not its sha256 (a status poll counts it
    done): the job says so, keeps the file aside as ``.bad`` and computes that shard again."""
    plan = make_plan(tmp_path)
    run(plan, tmp_path)
    corrupt = _flip_a_byte(plan.shard_path(1))
    done = mtimes(plan, [0, 2])
    n_traced = len(traced(tmp_path))
    with caplog.at_level("WARNING"):
        _, path = run(plan, tmp_path)
    warning = "shard 1 of double/k: fails its sha256 checksum (altered or corrupt); computing it again"
    assert warning in caplog.text
    assert {t[0] for t in traced(tmp_path)[n_traced:]} == {1}
    assert mtimes(plan, [0, 2]) == done
    assert plan.shard_path(1).with_name("0001-of-0003.parquet.bad").read_bytes() == corrupt
    assert plan.is_done(1, checksum=True)
    merged = pd.concat([pd.read_parquet(f) for f in verify(plan, [path])])
    assert list(merged.value) == [2 * r for r in range(20)]


@pytest.mark.unit
def test_merge_refuses_shards_of_two_dtypes(merged_run):
    plan, manifests = merged_run
    for manifest, dtype in zip(manifests, ["bfloat16", "float32", "float32"], strict=True):
        obj = json.loads(manifest.read_text())
        obj["shards"][0]["stats"]["dtype"] = dtype
        manifest.write_text(json.dumps(obj))
    mix = r"different dtypes \(bfloat16: shard\(s\) 0; float32: shard\(s\) 1, 2\)"
    with pytest.raises(ShardError, match=mix):
        verify(plan, manifests)


@pytest.mark.unit
def test_merge_refuses_bf16_shards_of_two_device_kinds_and_takes_fp32_ones(merged_run):
    """Below float32 the numerics differ between device kinds (an A100 and an H100, two CPU models):
    one merge does not mix them. In float32 the kinds may differ."""
    plan, manifests = merged_run
    kinds = ["NVIDIA A100-SXM4-40GB", "NVIDIA H100", "NVIDIA H100"]
    for dtype in ("bfloat16", "float32"):
        for manifest, kind in zip(manifests, kinds, strict=True):
            obj = json.loads(manifest.read_text())
            obj["shards"][0]["stats"]["dtype"] = dtype
            obj["shards"][0]["device_kind"] = kind
            manifest.write_text(json.dumps(obj))
        if dtype == "bfloat16":
            mix = r"bfloat16 shards computed on different devices \(NVIDIA A100-SXM4-40GB: shard\(s\) 0; "
            mix += r"NVIDIA H100: shard\(s\) 1, 2\)"
            with pytest.raises(ShardError, match=mix) as err:
                verify(plan, manifests)
            assert len(str(err.value).splitlines()) == 1
        else:
            assert len(verify(plan, manifests)) == 3


@pytest.mark.unit
def test_a_shard_record_names_its_device_kind(merged_run):
    plan, _ = merged_run
    record = plan.read_record(0)
    assert record["device_kind"].startswith("cpu: ") and len(record["device_kind"]) > len("cpu: ")


@pytest.mark.unit
def test_job_without_enough_gpus_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    spec = ShardSpec(n_shards=2, shards_per_job=2, gpus_per_shard=1, chunk_size=3)
    plan = replace(make_plan(tmp_path), spec=spec)
    with pytest.raises(ShardError, match=r"needs 2 GPU\(s\) .* sees 1"):
        run(plan, tmp_path)


@pytest.mark.unit
def test_sigterm_stops_a_worker_and_says_why(tmp_path):
    """submitit's task wrapper ignores SIGTERM; a shard worker must stop (time limit, scancel)."""
    import threading

    plan = make_plan(tmp_path, n_items=20, n_shards=1, shards_per_job=1)

    def terminate_when_running():
        deadline = time.time() + 60
        while time.time() < deadline:
            if plan.status_path(0).exists():
                os.kill(json.loads(plan.status_path(0).read_text())["pid"], signal.SIGTERM)
                return
            time.sleep(0.02)

    threading.Thread(target=terminate_when_running, daemon=True).start()
    forever = {"die_shard": 0, "die_at": 10**9, "hang": True}
    with pytest.raises(ShardError, match="1 of 1 worker"):
        run(plan, tmp_path, **forever)
    status = json.loads(plan.status_path(0).read_text())
    assert status["state"] == "failed" and "terminated by signal SIGTERM" in status["error"]


@pytest.mark.unit
def test_job_cpus_follow_slurm_not_the_host(monkeypatch):
    from shardwise.shards.runner import job_cpus

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert job_cpus(3) == 3
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(72)))
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", "18")
    assert job_cpus(1) == 18
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert job_cpus(1) == 2


def _kill_when_running(plan, target: str, sig: int = signal.SIGKILL) -> dict:
    """In a thread: once shard 0 runs, SIGKILL its compute process or that process's parent (the
    submitit wrapper). Returns {"compute": pid, "wrapper": pid} as they were."""
    seen: dict = {}

    def kill():
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                pid = json.loads(plan.status_path(0).read_text())["pid"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.02)
                continue
            seen["compute"] = pid
            seen["wrapper"] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            os.kill(seen[target], sig)
            return

    threading.Thread(target=kill, daemon=True).start()
    return seen


def _gone(pid: int, within_s: float = 30.0) -> bool:
    deadline = time.time() + within_s
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.integration
@pytest.mark.parametrize("target", ["compute", "wrapper"])
def test_a_killed_worker_names_its_shard_and_cause_and_leaves_no_process(tmp_path, target):
    plan = make_plan(tmp_path, n_items=20, n_shards=1, shards_per_job=1)
    seen = _kill_when_running(plan, target)
    forever = {"die_shard": 0, "die_at": 10**9, "hang": True}
    with pytest.raises(ShardError) as err:
        run(plan, tmp_path, **forever)
    message = str(err.value)
    assert "1 of 1 worker(s) failed: shard 0: " in message and str(plan.log_path(0)) in message
    pid = seen["compute"]
    if target == "compute":
        assert f"its compute process pid {pid} died without a word" in message
    else:  # the compute process ends with its wrapper (SIGTERM from the kernel), or is killed
        assert "terminated by signal SIGTERM" in message or f"compute process pid {pid}" in message
    assert _gone(pid) and _gone(seen["wrapper"])


@pytest.mark.integration
def test_a_stopped_job_stops_its_workers_and_they_say_why(tmp_path):
    """SIGTERM to the job's own process (SIGINT is handled alike): it passes the stop on
    to its workers, each compute process writes why it ended into its status and is gone, as is
    its submitit wrapper; the job exits 128 + 15."""
    import subprocess
    import sys

    import shardwise

    plan = make_plan(tmp_path, n_items=20, n_shards=1, shards_per_job=1)
    script = (
        "from pathlib import Path; from test_shards import make_plan, run; "
        f"tmp = Path({str(tmp_path)!r}); "
        "run(make_plan(tmp, n_items=20, n_shards=1, shards_per_job=1), tmp, die_at=10**9, hang=True)"
    )
    src = str(Path(shardwise.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), src])}
    job = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    seen: dict[str, int] = {}
    gone, stderr = False, ""
    try:
        deadline = time.time() + 120
        while not seen and time.time() < deadline and job.poll() is None:
            try:
                seen["compute"] = json.loads(plan.status_path(0).read_text())["pid"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.05)
        stat = Path(f"/proc/{seen['compute']}/stat").read_text()
        seen["wrapper"] = int(stat.rsplit(")", 1)[1].split()[1])
        job.send_signal(signal.SIGTERM)
        _, stderr = job.communicate(timeout=60)
        gone = _gone(seen["compute"]) and _gone(seen["wrapper"])
    finally:
        if not gone:  # leave no process behind
            for pid in [job.pid, *seen.values()]:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
    assert job.returncode == 128 + signal.SIGTERM, stderr
    assert gone
    status = json.loads(plan.status_path(0).read_text())
    assert status["state"] == "failed" and "ShardError: terminated by signal" in status["error"], status
    assert not plan.is_done(0)


@pytest.mark.unit
def test_forward_time_is_counted_only_when_asked(monkeypatch):
    """SHARDWISE_TIME_FORWARD=1 (bench/rehearsal.py) times each forward pass of a shard's model, so
    a stage's record can say how much of its time the pipeline spent outside the model."""
    import torch

    from shardwise import clock

    class Slow(torch.nn.Module):
        def forward(self, x):
            time.sleep(0.05)
            return x if x is not None else 1 / 0

    monkeypatch.delenv("SHARDWISE_TIME_FORWARD", raising=False)
    untimed = Slow()
    clock.time_forward(untimed)
    assert clock.forward_seconds() is None and "forward" not in vars(untimed)
    monkeypatch.setenv("SHARDWISE_TIME_FORWARD", "1")
    model = Slow()
    clock.time_forward(model)
    before = clock.forward_seconds()
    for _ in range(3):
        model(torch.zeros(1))
    with pytest.raises(ZeroDivisionError):  # a pass that ends early (activations stop after a layer)
        model(None)
    time.sleep(1.0)  # outside the model: not counted
    assert 0.2 <= clock.forward_seconds() - before < 1.0


@pytest.mark.unit
def test_forward_time_counts_the_parts_a_stage_calls_on_their_own_once(monkeypatch):
    """Teacher logits call the base model and the LM head themselves, activations the base model:
    those passes count too, and a part's pass inside the whole model's counts once."""
    import torch

    from shardwise import clock

    class Part(torch.nn.Module):
        def forward(self, x):
            time.sleep(0.1)
            return x

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base_model, self.head = Part(), Part()

        def get_output_embeddings(self):
            return self.head

        def forward(self, x):
            return self.head(self.base_model(x))

    monkeypatch.setenv("SHARDWISE_TIME_FORWARD", "1")
    model = LM()
    clock.time_forward(model)
    before = clock.forward_seconds()
    model(torch.zeros(1))  # 0.2 s: base and head inside the model's pass, counted once
    model.head(model.base_model(torch.zeros(1)))  # 0.2 s: the teacher's way
    assert 0.4 <= clock.forward_seconds() - before < 0.55
