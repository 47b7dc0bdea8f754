"""Run the lamost-mdwarf pipeline inside ONE SLURM allocation with dask-jobqueue's SLURMRunner.

Start this script on every task of the allocation (``srun python ...``; see
``pipeline_runner.sbatch``). ``dask_jobqueue.slurm.SLURMRunner`` gives each task a role
from ``SLURM_PROCID``: task 0 runs the Dask scheduler, task 1 runs the pipeline through
``lamost_mdwarf.cli`` with ``--scheduler`` set to that scheduler, every other task is a
Dask worker. When the pipeline returns, the runner stops the scheduler and the workers
exit, so the job ends. Needs at least 3 tasks.

Everything after ``--`` is the lamost-mdwarf command line, e.g.::

    srun python deploy/slurm/run_in_allocation.py -- \\
        run --spectra "$SPECTRA" --labels "$LABELS" --workdir "$WORKDIR"
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Mapping, Sequence

#: Options that the runner sets itself and that must not be in the pipeline arguments.
_RUNNER_OWNED_OPTIONS = ("--scheduler", "--cluster", "--cluster-config", "--n-workers", "--adaptive")


def parse_arguments(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split ``argv`` into the runner's options and the lamost-mdwarf arguments after ``--``.

    Parameters
    ----------
    argv : sequence of str
        Command-line arguments without the program name.

    Returns
    -------
    options : argparse.Namespace
        ``scheduler_file``, ``memory_limit``, ``threads_per_worker``, ``local_directory``,
        ``worker_wait_timeout``.
    pipeline_args : list of str
        Arguments for ``lamost_mdwarf.cli.main``.
    """
    parser = argparse.ArgumentParser(
        prog="run_in_allocation.py",
        usage="srun python %(prog)s [options] -- run --spectra PATH --labels FILE --workdir DIR",
        description="Scheduler, pipeline client and Dask workers in one SLURM allocation.",
    )
    parser.add_argument(
        "--scheduler-file",
        default="dask-scheduler-{job_id}.json",
        help="where the scheduler publishes its address; must be on a file system all nodes "
        "share; {job_id} becomes SLURM_JOB_ID (default: %(default)s in the working directory)",
    )
    parser.add_argument(
        "--memory-limit",
        default=None,
        help="memory limit per worker, e.g. 4GiB (default: SLURM_MEM_PER_CPU x "
        "SLURM_CPUS_PER_TASK, or SLURM_MEM_PER_NODE shared by the node's tasks)",
    )
    parser.add_argument(
        "--threads-per-worker",
        type=int,
        default=None,
        help="threads per worker (default: SLURM_CPUS_PER_TASK, else 1)",
    )
    parser.add_argument(
        "--local-directory",
        default=None,
        help="node-local scratch where workers spill (default: $TMPDIR, else /tmp)",
    )
    parser.add_argument(
        "--worker-wait-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for all workers before starting with those present (default: %(default)s)",
    )
    argv = list(argv)
    if "--" not in argv:
        parser.error("put the lamost-mdwarf arguments after '--', e.g. -- run --spectra ...")
    split = argv.index("--")
    options = parser.parse_args(argv[:split])
    pipeline_args = argv[split + 1 :]
    if not pipeline_args:
        parser.error("no lamost-mdwarf arguments after '--'")
    owned = [arg for arg in pipeline_args if arg.split("=", 1)[0] in _RUNNER_OWNED_OPTIONS]
    if owned:
        parser.error(
            f"{', '.join(owned)}: the allocation is the cluster; the runner passes --scheduler itself"
        )
    if options.threads_per_worker is not None and options.threads_per_worker < 1:
        parser.error("--threads-per-worker must be >= 1")
    return options, pipeline_args


def _expand_tasks_per_node(value: str) -> list[int]:
    """Expand SLURM's compressed ``SLURM_TASKS_PER_NODE`` (``"8(x2),4"`` -> [8, 8, 4])."""
    counts: list[int] = []
    for part in value.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            raise ValueError(f"cannot parse SLURM_TASKS_PER_NODE={value!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def tasks_on_this_node(environ: Mapping[str, str]) -> int:
    """Number of tasks of this job step on the current node.

    Parameters
    ----------
    environ : mapping
        The task's environment (``SLURM_NTASKS_PER_NODE`` or ``SLURM_TASKS_PER_NODE``
        with ``SLURM_NODEID``).

    Returns
    -------
    int
        Task count, at least 1.
    """
    if environ.get("SLURM_NTASKS_PER_NODE"):
        return max(1, int(environ["SLURM_NTASKS_PER_NODE"]))
    if environ.get("SLURM_TASKS_PER_NODE"):
        counts = _expand_tasks_per_node(environ["SLURM_TASKS_PER_NODE"])
        node = int(environ.get("SLURM_NODEID", "0"))
        return max(1, counts[min(node, len(counts) - 1)])
    return 1


def worker_memory_limit_from_slurm(environ: Mapping[str, str]) -> str | None:
    """Per-worker memory limit implied by the allocation, or None when SLURM does not say.

    Parameters
    ----------
    environ : mapping
        The task's environment. ``SLURM_MEM_PER_CPU`` and ``SLURM_MEM_PER_NODE`` are in
        MiB (SLURM calls them MB).

    Returns
    -------
    str or None
        A size such as ``"4096MiB"``.
    """
    cpus_per_task = int(environ.get("SLURM_CPUS_PER_TASK") or 1)
    if environ.get("SLURM_MEM_PER_CPU"):
        return f"{int(environ['SLURM_MEM_PER_CPU']) * cpus_per_task}MiB"
    if environ.get("SLURM_MEM_PER_NODE"):
        return f"{int(environ['SLURM_MEM_PER_NODE']) // tasks_on_this_node(environ)}MiB"
    return None


def worker_options(options: argparse.Namespace, environ: Mapping[str, str]) -> dict[str, object]:
    """Keyword arguments of each ``distributed.Worker`` the runner starts.

    Parameters
    ----------
    options : argparse.Namespace
        From :func:`parse_arguments`.
    environ : mapping
        The task's environment.

    Returns
    -------
    dict
        ``nthreads``, ``memory_limit`` and ``local_directory``.
    """
    threads = options.threads_per_worker or int(environ.get("SLURM_CPUS_PER_TASK") or 1)
    memory_limit = options.memory_limit or worker_memory_limit_from_slurm(environ)
    if memory_limit is None:
        print(
            "warning: SLURM gives no memory per task (use --mem-per-cpu or --mem) and "
            "--memory-limit is not set; each worker assumes it may use the whole node",
            file=sys.stderr,
        )
        memory_limit = "auto"
    local_directory = options.local_directory or environ.get("TMPDIR") or "/tmp"
    return {"nthreads": threads, "memory_limit": memory_limit, "local_directory": local_directory}


def run_pipeline(pipeline_args: Sequence[str], scheduler_address: str) -> int:
    """Call the lamost-mdwarf command line in this process against ``scheduler_address``.

    Parameters
    ----------
    pipeline_args : sequence of str
        lamost-mdwarf arguments, e.g. ``["run", "--spectra", ...]``.
    scheduler_address : str
        Address of the runner's scheduler; appended as ``--scheduler``.

    Returns
    -------
    int
        Exit status of the command (0 on success).
    """
    import click

    cli = importlib.import_module("lamost_mdwarf.cli")
    try:
        result = cli.main(
            [*pipeline_args, "--scheduler", scheduler_address],
            standalone_mode=False,
            prog_name="lamost-mdwarf",
        )
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except click.exceptions.Abort:
        print("Aborted!", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Start the runner; on the client task, run the pipeline and return its status.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments (default ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit status. The scheduler and worker tasks exit inside the runner when the
        client task finishes.
    """
    options, pipeline_args = parse_arguments(sys.argv[1:] if argv is None else argv)
    try:
        from dask_jobqueue.slurm import SLURMRunner
    except ImportError as error:
        print(
            f"dask-jobqueue is needed for the SLURM runner ({error}); install it with: "
            "pip install 'lamost-mdwarf[hpc]'",
            file=sys.stderr,
        )
        return 2
    from distributed import Client

    with SLURMRunner(
        scheduler_file=options.scheduler_file,
        scheduler_options={"dashboard_address": ":8787"},
        worker_options=worker_options(options, os.environ),
    ) as runner:
        # Only the client task (SLURM_PROCID 1) gets here; the scheduler and worker
        # tasks serve inside SLURMRunner() and exit when this block ends.
        with Client(runner.scheduler_address) as client:
            try:
                client.wait_for_workers(runner.n_workers, timeout=options.worker_wait_timeout)
            except TimeoutError:
                present = len(client.nthreads())
                print(
                    f"warning: {present} of {runner.n_workers} workers connected within "
                    f"{options.worker_wait_timeout:g} s; starting with those",
                    file=sys.stderr,
                )
            print(
                f"Dask scheduler {runner.scheduler_address} with {runner.n_workers} workers; "
                f"dashboard {client.dashboard_link}",
                flush=True,
            )
        return run_pipeline(pipeline_args, runner.scheduler_address)


if __name__ == "__main__":
    sys.exit(main())
