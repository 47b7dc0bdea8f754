"""Fault tolerance on a real cluster started by the test: a scheduler and two worker
processes (``dask scheduler`` / ``dask worker --nworkers 2``, each worker under a nanny)
on 127.0.0.1.

(a) A worker process SIGKILLed in the middle of inference: the nanny starts a new one, the
    scheduler recomputes what the dead worker held or was computing, and the results are
    bit for bit those of an undisturbed local run.
(b) The client (``lamost-mdwarf run --scheduler ...``) SIGKILLed in the middle of
    inference: the rerun computes exactly the rows beyond the committed extent, leaves
    the committed rows' chunk files untouched, and ends with the same results.

Why bit for bit: every inference task fits one store chunk, and a chunk's labels depend
only on that chunk's spectra and the model; the worker processes of both the local run
and the test cluster run single-threaded BLAS (the nanny sets ``OMP_NUM_THREADS=1``
etc.), so a task recomputed on another process performs the same floating-point
operations in the same order.

The shared reference is a full ``run_pipeline`` on the 1200-star simulated survey on a
local 2-process cluster, with 32-star chunks so inference has ~11 blocks to interrupt.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

import lamost_mdwarf
from lamost_mdwarf.pipeline import run_pipeline
from lamost_mdwarf.stages.infer import run_infer

pytestmark = pytest.mark.reliability

# The scheduler and the workers of the test cluster cannot import this module: send the
# functions they run (client.run, run_on_scheduler) by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

CHUNK = 32  # stars per store chunk; inference blocks are 4 chunks (128 rows) on 2 workers
BLOCK_ROWS = 4 * CHUNK


def committed_rows(results: Path) -> int:
    """The committed extent of a results store (0 before it exists)."""
    try:
        return int(json.loads((results / "zarr.json").read_text())["attributes"].get("n_star", 0))
    except (FileNotFoundError, KeyError, ValueError):
        return 0


def worker_pid() -> int:
    """Process id of the worker this runs on (through ``client.run``)."""
    return os.getpid()


def assert_same_results(a: Path, b: Path) -> None:
    """Every variable of two results stores is identical (NaN equal to NaN)."""
    ra, rb = lamost_mdwarf.open_results(a).compute(), lamost_mdwarf.open_results(b).compute()
    assert ra.sizes == rb.sizes
    assert set(ra.data_vars) == set(rb.data_vars)
    for name in ra.data_vars:
        va, vb = ra[name].values, rb[name].values
        if va.dtype.kind in "fc":
            np.testing.assert_array_equal(va, vb, err_msg=name)
        else:
            assert va.tolist() == vb.tolist(), name


def copy_without_results(reference: Path, dest: Path) -> Path:
    """A work directory with the reference's store, model and state but no results."""
    shutil.copytree(reference, dest, ignore=shutil.ignore_patterns("results.zarr", "catalog.*", "*.lock"))
    state_path = dest / "pipeline_state.json"
    state = json.loads(state_path.read_text())
    state.pop("catalog", None)
    state_path.write_text(json.dumps(state))
    return dest


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """``dask scheduler`` and ``dask worker --nworkers 2 --nthreads 1`` subprocesses."""
    from distributed import Client

    root = tmp_path_factory.mktemp("cluster")
    scheduler_file = root / "scheduler.json"
    # A transition log long enough to keep the story of every task of a test (default 1000).
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DASK_DISTRIBUTED__ADMIN__LOW_LEVEL_LOG_LENGTH": "1000000"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
         "--no-dashboard", "--scheduler-file", str(scheduler_file)],
        stdout=subprocess.DEVNULL, stderr=open(root / "scheduler.log", "w"), start_new_session=True, env=env)]
    try:
        deadline = time.time() + 60
        while not scheduler_file.exists() and time.time() < deadline:
            time.sleep(0.1)
        assert scheduler_file.exists(), (root / "scheduler.log").read_text()[-2000:]
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_worker", "--scheduler-file", str(scheduler_file),
             "--nworkers", "2", "--nthreads", "1", "--memory-limit", "2GiB", "--no-dashboard",
             "--death-timeout", "60", "--local-directory", str(root / "workers")],
            stdout=subprocess.DEVNULL, stderr=open(root / "workers.log", "w"), start_new_session=True, env=env))
        with Client(scheduler_file=str(scheduler_file), timeout=30) as client:
            client.wait_for_workers(2, timeout=90)
            address = client.scheduler.address
        yield {"address": address, "scheduler_file": str(scheduler_file), "root": root}
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


@pytest.fixture(scope="module")
def reference(small_survey, tmp_path_factory):
    """The undisturbed local run: ``run_pipeline`` on a local cluster of 2 worker processes."""
    from distributed import Client, LocalCluster

    work = tmp_path_factory.mktemp("reference") / "work"
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as local, \
            Client(local) as client:
        run_pipeline([small_survey.spectra_dir], small_survey.labels_path, work, client, make_figures=False,
                     chunk_stars=CHUNK)
    n_star = lamost_mdwarf.open_survey_store(work / "store.zarr").sizes["star"]
    assert n_star > 3 * BLOCK_ROWS  # several inference blocks to interrupt
    return work


def test_worker_sigkilled_mid_inference_gives_identical_results(cluster, reference, tmp_path):
    from distributed import Client

    work = copy_without_results(reference, tmp_path / "work")
    results = work / "results.zarr"
    with Client(cluster["address"], timeout=30) as client:
        client.wait_for_workers(2, timeout=60)
        pids_before = client.run(worker_pid)
        killed: dict = {}

        def kill_a_busy_worker() -> None:
            deadline = time.time() + 120
            while time.time() < deadline:
                if committed_rows(results) >= BLOCK_ROWS:
                    # a worker with an inference task (not one of the small metadata reads)
                    busy = {addr: keys for addr, keys in client.processing().items()
                            if any("infer_block" in str(key) for key in keys)}
                    if busy:
                        address, keys = next(iter(busy.items()))
                        killed.update(address=address, pid=pids_before[address], keys=list(keys),
                                      committed=committed_rows(results))
                        os.kill(pids_before[address], signal.SIGKILL)
                        return
                time.sleep(0.005)

        killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
        killer.start()
        computed, total = run_infer(work / "store.zarr", work / "model.zarr", results)
        killer.join()

        # The kill happened mid-inference, on a worker that was computing.
        assert killed, "inference finished before a worker could be killed"
        assert BLOCK_ROWS <= killed["committed"] < total
        assert computed == total == lamost_mdwarf.open_survey_store(work / "store.zarr").sizes["star"]
        # The scheduler took the interrupted tasks up again (each went to 'processing' twice).
        stories = client.run_on_scheduler(  # (keys arrive as lists: msgpack has no tuples)
            lambda dask_scheduler, keys: [[(e[1], e[2], e[4]) for e in dask_scheduler.story(
                tuple(key) if isinstance(key, list) else key)] for key in keys],
            keys=killed["keys"])
        restarted = sum(sum(1 for e in story if e[1] == "processing") >= 2 for story in stories)
        assert restarted >= 1, (killed, stories)
        assert any("handle-worker-cleanup" in e[2] for story in stories for e in story), stories
        # The nanny replaced the dead worker process.
        client.wait_for_workers(2, timeout=60)
        pids_after = client.run(worker_pid)
        assert killed["pid"] not in pids_after.values() and len(pids_after) == 2
    print(f"\nworker {killed['address']} (pid {killed['pid']}) SIGKILLed with {killed['committed']}/{total} rows "
          f"committed; {restarted} of its tasks were recomputed; the nanny started pid(s) "
          f"{sorted(set(pids_after.values()) - set(pids_before.values()))}")
    assert_same_results(results, reference / "results.zarr")


def test_client_sigkilled_mid_inference_resumes_without_recomputing(cluster, reference, small_survey, tmp_path):
    work = copy_without_results(reference, tmp_path / "work")
    results = work / "results.zarr"
    cmd = [sys.executable, "-m", "lamost_mdwarf.cli", "run", "--spectra", str(small_survey.spectra_dir),
           "--labels", str(small_survey.labels_path), "--workdir", str(work), "--no-figures",
           "--scheduler", cluster["address"]]
    total = lamost_mdwarf.open_survey_store(work / "store.zarr").sizes["star"]

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while committed_rows(results) < BLOCK_ROWS and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    if proc.poll() is not None:
        pytest.fail(f"the run ended before it could be killed (rc={proc.returncode}): {proc.communicate()[1][-3000:]}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    committed = committed_rows(results)
    assert BLOCK_ROWS <= committed < total and committed % CHUNK == 0

    # The chunk files of the committed rows, as the killed run left them.
    def committed_chunk_files() -> dict[str, int]:
        files = {}
        for path in results.glob("*/c/**/*"):
            if path.is_file() and (int(path.relative_to(results).parts[2]) + 1) * CHUNK <= committed:
                files[str(path)] = path.stat().st_mtime_ns
        return files

    before = committed_chunk_files()
    # every committed chunk row has a file per per-star metadata column (never all fill)
    assert len(before) >= committed // CHUNK * 10

    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    stages = resumed.stdout.split("stages run:")[1].split("\n")[0]
    assert "infer" in stages and not {"train", "validate", "preprocess", "select"} & set(
        s.strip() for s in stages.split(","))
    # Exactly the rows beyond the committed extent were computed by the rerun ...
    inferred = re.findall(r"inferred (\d+) spectra \((\d+) rows\)", (work / "run.log").read_text())
    assert inferred[-1] == (str(total - committed), str(total))
    # ... and the committed rows' chunks were neither recomputed nor rewritten.
    assert committed_chunk_files() == before
    print(f"\nclient SIGKILLed with {committed}/{total} rows committed; the rerun computed {inferred[-1][0]} rows; "
          f"{len(before)} chunk files of the committed rows untouched")
    assert_same_results(results, reference / "results.zarr")
