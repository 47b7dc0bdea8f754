"""Where the work runs: one way to get a Dask client for every command.

:func:`dask_client` starts (or connects to) the Dask cluster a command computes on and
closes everything it started on exit, also after an exception or Ctrl-C:

- no option: a :class:`distributed.LocalCluster` with one single-threaded worker process
  per core;
- ``scheduler="tcp://host:8786"`` (or a scheduler JSON file): an existing cluster;
- ``cluster="slurm"`` / ``"pbs"``: a dask-jobqueue cluster whose workers are batch jobs;
- ``cluster="kubernetes"``: a ``DaskCluster`` resource through the dask-kubernetes operator.

Site settings (queue, walltime, image, ...) come from a YAML file that follows Dask's
configuration layout (``jobqueue.slurm.*``, ``jobqueue.pbs.*``, ``kubernetes.*``,
``distributed.*``); see ``deploy/jobqueue.yaml``. :func:`cluster_options` gives every
click command the same ``--scheduler/--cluster/...`` options and
:func:`dask_client_from_options` turns them into the context manager.
"""
from __future__ import annotations

import contextlib
import copy
import getpass
import importlib
import importlib.util
import os
import signal
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
import dask
import dask.config
import dask.system
import yaml
from dask.utils import format_bytes, parse_bytes, parse_timedelta
from distributed import Client, LocalCluster

__all__ = [
    "CLUSTER_KINDS",
    "CLUSTER_OPTION_NAMES",
    "ClusterResources",
    "ClusterSetupError",
    "MissingClusterDependencyError",
    "SchedulerConnectionError",
    "applied_cluster_config",
    "cluster_options",
    "cluster_resources",
    "create_cluster",
    "dask_client",
    "dask_client_from_options",
    "jobqueue_worker_layout",
    "kubernetes_cluster_spec",
    "load_cluster_config",
    "worker_memory_limit",
]

#: Values accepted by ``cluster=`` / ``--cluster``.
CLUSTER_KINDS: tuple[str, ...] = ("local", "slurm", "pbs", "kubernetes")

#: Keyword names that :func:`cluster_options` adds to a click command.
CLUSTER_OPTION_NAMES: tuple[str, ...] = (
    "scheduler",
    "cluster",
    "cluster_config",
    "n_workers",
    "threads_per_worker",
    "memory_limit",
    "adaptive",
)

_JOBQUEUE_CLASSES = {"slurm": "SLURMCluster", "pbs": "PBSCluster"}
_JOBQUEUE_NAMES = {"slurm": "SLURM", "pbs": "PBS"}
_DEFAULT_DASK_IMAGE = "ghcr.io/dask/dask:latest"


class ClusterSetupError(Exception):
    """The Dask cluster could not be started or reached; the message says what to change."""


class MissingClusterDependencyError(ClusterSetupError, ImportError):
    """An optional package needed for the requested cluster type is not installed."""


class SchedulerConnectionError(ClusterSetupError, OSError):
    """No Dask scheduler answered at the given address in time."""


@dataclass(frozen=True)
class ClusterResources:
    """What the workers of a connected client offer.

    Attributes
    ----------
    n_workers : int
        Number of connected workers.
    total_threads : int
        Sum of the worker thread counts (tasks that can run at once).
    threads_per_worker : int
        Smallest thread count of any worker.
    memory_limit_per_worker : int or None
        Smallest per-worker memory limit in bytes, or None when no worker has a limit.
    """

    n_workers: int
    total_threads: int
    threads_per_worker: int
    memory_limit_per_worker: int | None

    def describe(self) -> str:
        """One line such as ``"4 workers x 1 thread, 2.00 GiB per worker"``."""
        memory = (
            "no memory limit"
            if self.memory_limit_per_worker is None
            else f"{format_bytes(self.memory_limit_per_worker)} per worker"
        )
        workers = "worker" if self.n_workers == 1 else "workers"
        threads = "thread" if self.threads_per_worker == 1 else "threads"
        return f"{self.n_workers} {workers} x {self.threads_per_worker} {threads}, {memory}"


# --------------------------------------------------------------------------- config


def load_cluster_config(path: str | Path) -> dict[str, Any]:
    """Read a Dask-style YAML configuration file.

    Parameters
    ----------
    path : str or Path
        YAML file with top-level sections such as ``jobqueue``, ``kubernetes`` or
        ``distributed`` (the layout of Dask's own configuration files).

    Returns
    -------
    dict
        The parsed mapping (empty for an empty file).

    Raises
    ------
    ClusterSetupError
        If the file is missing, is not valid YAML, or is not a mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise ClusterSetupError(f"cluster config file {path} does not exist")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ClusterSetupError(f"cluster config file {path} is not valid YAML: {error}") from error
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ClusterSetupError(
            f"cluster config file {path} must hold a mapping such as 'jobqueue: {{slurm: ...}}', "
            f"found a {type(content).__name__}"
        )
    return content


# Packages that register the defaults of a configuration section when imported.
_SECTION_DEFAULTS = {"jobqueue": "dask_jobqueue", "kubernetes": "dask_kubernetes"}


def _load_config_defaults(user_config: Mapping[str, Any]) -> None:
    """Import the packages whose defaults a config file overrides, when installed.

    Their defaults must be in ``dask.config`` before the file is merged: a package
    imported later would register its defaults inside the temporary block and lose them
    when the block restores the previous configuration.
    """
    for section, module_name in _SECTION_DEFAULTS.items():
        if section in user_config:
            with contextlib.suppress(ImportError):
                _import_optional(module_name, "", "")


@contextlib.contextmanager
def applied_cluster_config(path: str | Path | None) -> Iterator[None]:
    """Merge a YAML configuration file into ``dask.config`` for the duration of a block.

    Values in the file override Dask's defaults and any ``DASK_CONFIG`` files key by key
    (``jobqueue.slurm.cores`` replaces just that key; the other ``jobqueue.slurm``
    defaults stay). The previous configuration is restored on exit.

    Parameters
    ----------
    path : str, Path or None
        YAML file to apply; None applies nothing.
    """
    if path is None:
        yield
        return
    user_config = load_cluster_config(path)
    _load_config_defaults(user_config)
    merged = dask.config.update(copy.deepcopy(dask.config.config), user_config, priority="new")
    top_level_keys = {dask.config.canonical_name(str(key), merged) for key in user_config}
    with dask.config.set({key: merged[key] for key in top_level_keys}):
        yield


# --------------------------------------------------------------------------- imports


def _import_optional(module_name: str, extra: str, purpose: str) -> Any:
    """Import an optional dependency or explain which extra installs it."""
    # dask_jobqueue.runner replaces the SIGINT handler with sys.exit at import time;
    # keep Ctrl-C a KeyboardInterrupt in the process that builds the cluster.
    in_main_thread = threading.current_thread() is threading.main_thread()
    sigint_handler = signal.getsignal(signal.SIGINT) if in_main_thread else None
    try:
        return importlib.import_module(module_name)
    except ImportError as error:
        distribution = module_name.split(".")[0].replace("_", "-")
        raise MissingClusterDependencyError(
            f"{purpose} needs the optional package {distribution}, which is not installed "
            f"({error}). Install it with: pip install 'lamost-mdwarf[{extra}]'"
        ) from error
    finally:
        if in_main_thread and sigint_handler is not None:
            signal.signal(signal.SIGINT, sigint_handler)


# --------------------------------------------------------------------------- sizing


def _validated_memory_limit(memory_limit: str | None, allow_auto: bool) -> int | str | None:
    """Parse ``--memory-limit`` into bytes (or keep ``"auto"`` where allowed)."""
    if memory_limit is None:
        return None
    if allow_auto and str(memory_limit).strip().lower() == "auto":
        return "auto"
    try:
        n_bytes = parse_bytes(memory_limit)
    except (ValueError, TypeError) as error:
        raise ClusterSetupError(
            f"memory limit {memory_limit!r} is not a size; use a value such as 2GiB or 1500MB"
        ) from error
    if n_bytes <= 0:
        raise ClusterSetupError(f"memory limit {memory_limit!r} must be positive")
    return n_bytes


def jobqueue_worker_layout(
    kind: str,
    threads_per_worker: int | None = None,
    memory_limit: str | None = None,
) -> dict[str, int]:
    """Cores, worker processes and memory of one SLURM/PBS job.

    Starts from ``jobqueue.<kind>.cores/processes/memory`` in ``dask.config`` and applies
    the command-line overrides: ``threads_per_worker`` sets the threads of each worker
    process (``cores = processes * threads``), ``memory_limit`` is the limit of each
    worker (``memory = processes * memory_limit``). Without ``processes`` in the config
    every core gets its own single-threaded worker, as in the local default.

    Parameters
    ----------
    kind : {"slurm", "pbs"}
        Which ``jobqueue`` section to read.
    threads_per_worker : int, optional
        Threads per worker process.
    memory_limit : str, optional
        Memory limit per worker process, e.g. ``"4GiB"``.

    Returns
    -------
    dict
        ``{"cores": int, "processes": int, "memory": int}``, memory in bytes per job;
        ready to pass to ``SLURMCluster``/``PBSCluster``.

    Raises
    ------
    ClusterSetupError
        If cores or memory are neither configured nor implied by the overrides.
    """
    if kind not in _JOBQUEUE_CLASSES:
        raise ClusterSetupError(f"unknown job queue {kind!r}; expected one of {sorted(_JOBQUEUE_CLASSES)}")
    section = f"jobqueue.{kind}"
    cores = dask.config.get(f"{section}.cores", None)
    processes = dask.config.get(f"{section}.processes", None)
    memory = dask.config.get(f"{section}.memory", None)
    if cores is None:
        raise ClusterSetupError(
            f"{section}.cores is not set: put the cores of one worker job in the YAML passed "
            "with --cluster-config (see deploy/jobqueue.yaml)"
        )
    cores = int(cores)
    if threads_per_worker is not None:
        if threads_per_worker < 1:
            raise ClusterSetupError(f"threads per worker must be >= 1, got {threads_per_worker}")
        if processes is None:
            processes = max(1, cores // threads_per_worker)
        cores = int(processes) * threads_per_worker
    if processes is None:
        processes = cores
    processes = int(processes)
    if processes < 1 or cores < processes:
        raise ClusterSetupError(
            f"{section}: {processes} worker processes do not fit in {cores} cores; "
            "set processes <= cores"
        )
    limit = _validated_memory_limit(memory_limit, allow_auto=False)
    if limit is not None:
        memory_bytes = int(limit) * processes
    elif memory is not None:
        try:
            memory_bytes = parse_bytes(memory)
        except (ValueError, TypeError) as error:
            raise ClusterSetupError(f"{section}.memory = {memory!r} is not a size such as 32GiB") from error
    else:
        raise ClusterSetupError(
            f"{section}.memory is not set: put the memory of one worker job in the YAML passed "
            "with --cluster-config, or give --memory-limit per worker"
        )
    return {"cores": cores, "processes": processes, "memory": int(memory_bytes)}


def _kubernetes_quantity(n_bytes: int) -> str:
    """Bytes as a Kubernetes memory quantity (``4Gi``, ``1536Mi`` or plain bytes)."""
    for suffix, factor in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if n_bytes % factor == 0:
            return f"{n_bytes // factor}{suffix}"
    return str(n_bytes)


def kubernetes_cluster_spec(
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | None = None,
) -> dict[str, Any]:
    """The ``DaskCluster`` resource that ``cluster="kubernetes"`` creates.

    Either the manifest named by ``kubernetes.custom-cluster-spec`` (e.g.
    ``deploy/kubernetes/daskcluster.yaml``, which mounts the shared volume) or one built
    with :func:`dask_kubernetes.operator.make_cluster_spec` from the ``kubernetes.*``
    configuration (name, image, env, resources, worker-command, scheduler-service-type,
    idle-timeout). The sizing arguments then override the worker group: ``n_workers``
    the replicas, ``threads_per_worker`` the worker's ``--nthreads`` and ``memory_limit``
    both the worker's ``--memory-limit`` and the container's memory request and limit,
    so Dask spills and pauses before Kubernetes kills the pod.

    Parameters
    ----------
    n_workers : int, optional
        Worker pods; default the manifest's replicas, or for a generated manifest
        ``kubernetes.count.start`` (1 when that is 0).
    threads_per_worker : int, optional
        ``--nthreads`` of each worker (default: as in the manifest, else the pod's CPUs).
    memory_limit : str, optional
        Memory per worker pod, e.g. ``"4GiB"``.

    Returns
    -------
    dict
        A ``kubernetes.dask.org/v1`` ``DaskCluster`` manifest.

    Raises
    ------
    ClusterSetupError
        If the custom manifest is missing or is not a DaskCluster.
    MissingClusterDependencyError
        If dask-kubernetes is not installed.
    """
    operator = _import_optional("dask_kubernetes.operator", "kubernetes", "--cluster kubernetes")
    custom = dask.config.get("kubernetes.custom-cluster-spec", None)
    if custom is not None:
        spec = _load_daskcluster_manifest(custom)
    else:
        name = str(dask.config.get("kubernetes.name")).format(
            user=getpass.getuser(), uuid=str(uuid.uuid4())[:10], **os.environ
        )
        worker_command = dask.config.get("kubernetes.worker-command", "dask-worker")
        if isinstance(worker_command, str):
            worker_command = worker_command.split()
        env = dask.config.get("kubernetes.env", {}) or {}
        spec = operator.make_cluster_spec(
            name=name,
            image=dask.config.get("kubernetes.image"),
            n_workers=int(dask.config.get("kubernetes.count.start", 0) or 0) or 1,
            resources=copy.deepcopy(dict(dask.config.get("kubernetes.resources", {}) or {})),
            env=dict(env) if isinstance(env, Mapping) else list(env),
            worker_command=list(worker_command),
            scheduler_service_type=dask.config.get("kubernetes.scheduler-service-type", "ClusterIP"),
            idle_timeout=int(dask.config.get("kubernetes.idle-timeout", 0) or 0),
        )
        # make_cluster_spec shares one resources dict between scheduler and workers.
        spec = copy.deepcopy(spec)
    limit = _validated_memory_limit(memory_limit, allow_auto=False)
    return _sized_cluster_spec(spec, n_workers, threads_per_worker, None if limit is None else int(limit))


def _load_daskcluster_manifest(source: str | Mapping[str, Any]) -> dict[str, Any]:
    """Read ``kubernetes.custom-cluster-spec`` (a YAML path or a mapping)."""
    if isinstance(source, Mapping):
        manifest: Any = copy.deepcopy(dict(source))
        origin = "kubernetes.custom-cluster-spec"
    else:
        path = Path(str(source))
        if not path.is_file():
            raise ClusterSetupError(
                f"kubernetes.custom-cluster-spec names {path}, which does not exist "
                f"(relative paths start from {Path.cwd()})"
            )
        try:
            manifest = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as error:
            raise ClusterSetupError(f"{path} is not valid YAML: {error}") from error
        origin = str(path)
    if (
        not isinstance(manifest, dict)
        or manifest.get("kind") != "DaskCluster"
        or not isinstance(manifest.get("spec", {}).get("worker", {}).get("spec"), dict)
    ):
        raise ClusterSetupError(f"{origin} is not a DaskCluster manifest with spec.worker.spec")
    return manifest


def _with_option(args: list[str], option: str, value: str) -> list[str]:
    """Set ``option value`` in a command line, replacing an existing value."""
    args = list(args)
    for index, arg in enumerate(args):
        if arg == option and index + 1 < len(args):
            args[index + 1] = value
            return args
        if arg.startswith(option + "="):
            args[index] = f"{option}={value}"
            return args
    return args + [option, value]


def _sized_cluster_spec(
    spec: dict[str, Any],
    n_workers: int | None,
    threads_per_worker: int | None,
    memory_limit_bytes: int | None,
) -> dict[str, Any]:
    """Apply the command-line sizing to the worker group of a DaskCluster manifest."""
    spec = copy.deepcopy(spec)
    worker_group = spec["spec"]["worker"]
    if n_workers is not None:
        worker_group["replicas"] = int(n_workers)
    container = worker_group["spec"]["containers"][0]
    args = _modern_dask_command(list(container.get("args") or []))
    if threads_per_worker is not None:
        args = _with_option(args, "--nthreads", str(threads_per_worker))
    if memory_limit_bytes is not None:
        args = _with_option(args, "--memory-limit", str(memory_limit_bytes))
        quantity = _kubernetes_quantity(memory_limit_bytes)
        resources = container.setdefault("resources", {}) or {}
        for field in ("requests", "limits"):
            resources[field] = {**(resources.get(field) or {}), "memory": quantity}
        container["resources"] = resources
    container["args"] = args
    for scheduler_container in spec["spec"].get("scheduler", {}).get("spec", {}).get("containers", []):
        scheduler_container["args"] = _modern_dask_command(list(scheduler_container.get("args") or []))
    return spec


def _modern_dask_command(command: list[str]) -> list[str]:
    """Replace a leading ``dask-worker``/``dask-scheduler`` by ``dask worker``/``dask scheduler``.

    Recent releases of distributed no longer install those two scripts, which the
    dask-kubernetes templates still call; the ``dask`` command exists in old and new ones.
    """
    legacy = {"dask-worker": ["dask", "worker"], "dask-scheduler": ["dask", "scheduler"]}
    if command and command[0] in legacy:
        return legacy[command[0]] + command[1:]
    return command


# --------------------------------------------------------------------------- clusters


def create_cluster(
    kind: str,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | None = None,
    processes: bool = True,
    echo: Callable[[str], None] = print,
) -> Any:
    """Build (but do not scale) the cluster object for ``kind``.

    For ``"local"`` the workers start with the cluster. For ``"slurm"``/``"pbs"`` the
    scheduler starts in this process and no job is submitted yet (call ``scale``); the
    job script can be inspected with ``cluster.job_script()``. For ``"kubernetes"`` the
    ``DaskCluster`` resource is created (this needs a reachable Kubernetes API).

    Parameters
    ----------
    kind : {"local", "slurm", "pbs", "kubernetes"}
        Cluster type.
    n_workers : int, optional
        Local: worker count (default: one per core). Kubernetes: initial worker pods.
        Ignored for SLURM/PBS, which are sized by ``scale``.
    threads_per_worker : int, optional
        Threads of each worker (local default 1; SLURM/PBS/Kubernetes default from the
        configuration).
    memory_limit : str, optional
        Memory limit of each worker, e.g. ``"2GiB"`` (local default ``"auto"``: the
        machine's memory shared evenly).
    processes : bool
        Local only: workers in separate processes (True) or threads of this process.
    echo : callable
        Receives one line of progress text per message.

    Returns
    -------
    distributed.deploy.Cluster
        The cluster; the caller closes it.

    Raises
    ------
    ClusterSetupError
        For an unknown kind, unusable sizes, or a missing optional dependency.
    """
    if kind == "local":
        if n_workers is None:
            n_workers = dask.system.CPU_COUNT
        if n_workers < 1:
            raise ClusterSetupError(f"number of workers must be >= 1, got {n_workers}")
        threads = 1 if threads_per_worker is None else threads_per_worker
        if threads < 1:
            raise ClusterSetupError(f"threads per worker must be >= 1, got {threads}")
        limit = _validated_memory_limit(memory_limit, allow_auto=True)
        return LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads,
            memory_limit="auto" if limit is None else limit,
            processes=processes,
        )
    if kind in _JOBQUEUE_CLASSES:
        jobqueue = _import_optional("dask_jobqueue", "hpc", f"--cluster {kind}")
        layout = jobqueue_worker_layout(kind, threads_per_worker, memory_limit)
        cluster_class = getattr(jobqueue, _JOBQUEUE_CLASSES[kind])
        try:
            cluster = cluster_class(**layout)
        except ValueError as error:
            raise ClusterSetupError(f"cannot build the {_JOBQUEUE_NAMES[kind]} cluster: {error}") from error
        walltime = dask.config.get(f"jobqueue.{kind}.walltime", None)
        echo(
            f"{_JOBQUEUE_NAMES[kind]} cluster: scheduler at {cluster.scheduler_address}; each job runs "
            f"{layout['processes']} worker(s) x {layout['cores'] // layout['processes']} thread(s) "
            f"with {format_bytes(layout['memory'] // layout['processes'])} each"
            + (f", walltime {walltime}" if walltime else "")
        )
        return cluster
    if kind == "kubernetes":
        spec = kubernetes_cluster_spec(n_workers, threads_per_worker, memory_limit)
        image = spec["spec"]["worker"]["spec"]["containers"][0]["image"]
        if image == _DEFAULT_DASK_IMAGE:
            echo(
                f"warning: kubernetes.image is Dask's default image {image}, which does not "
                "contain lamost-mdwarf; set kubernetes.image in --cluster-config to an image "
                "built from deploy/Dockerfile"
            )
        operator = _import_optional("dask_kubernetes.operator", "kubernetes", "--cluster kubernetes")
        echo(f"Kubernetes: creating DaskCluster {spec['metadata']['name']} with image {image}")
        return operator.KubeCluster(
            custom_cluster_spec=spec,
            namespace=dask.config.get("kubernetes.namespace", None),
        )
    raise ClusterSetupError(f"unknown cluster type {kind!r}; expected one of {', '.join(CLUSTER_KINDS)}")


def _connect(scheduler: str, connect_timeout: float | None) -> Client:
    """Connect to an existing scheduler by address or scheduler file."""
    timeout = connect_timeout
    if timeout is None:
        timeout = parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), "s")
    looks_like_file = "://" not in scheduler and (scheduler.endswith(".json") or Path(scheduler).is_file())
    if looks_like_file:
        if not Path(scheduler).is_file():
            raise ClusterSetupError(
                f"scheduler file {scheduler} does not exist; pass the file written by "
                "'dask scheduler --scheduler-file' or an address such as tcp://host:8786"
            )
        target = f"the scheduler in {scheduler}"
        connect = lambda: Client(scheduler_file=scheduler, timeout=timeout)  # noqa: E731
    else:
        target = scheduler
        connect = lambda: Client(scheduler, timeout=timeout)  # noqa: E731
    try:
        return connect()
    except (OSError, TimeoutError) as error:
        raise SchedulerConnectionError(
            f"could not reach a Dask scheduler at {target} within {timeout:g} s ({error}). "
            "Check that the scheduler is running, that host and port are right (the default "
            "port is 8786) and that this machine can reach it; raise the wait with "
            "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT=120s if it is still starting."
        ) from error


def _scale(
    cluster: Any,
    kind: str,
    n_workers: int | None,
    adaptive: bool,
    processes_per_job: int,
    echo: Callable[[str], None],
) -> None:
    """Request workers from a freshly built cluster (or make it adaptive)."""
    if kind in _JOBQUEUE_CLASSES:
        per_job = processes_per_job
        if adaptive:
            minimum = min(per_job, n_workers)
            cluster.adapt(minimum=minimum, maximum=n_workers)
            echo(f"adaptive: between {minimum} and {n_workers} workers, submitted as jobs on demand")
            return
        target = per_job if n_workers is None else n_workers
        cluster.scale(n=target)
        jobs = -(-target // per_job)
        echo(f"submitted {jobs} worker job(s) for {target} worker(s); work starts as the queue grants them")
        return
    if adaptive:
        cluster.adapt(minimum=1, maximum=n_workers)
        echo(f"adaptive: between 1 and {n_workers} workers")


def _echo_dashboard(client: Client, echo: Callable[[str], None]) -> None:
    """Print the dashboard link, when the scheduler serves one."""
    try:
        link = client.dashboard_link
    except Exception:  # the link is a convenience; never fail a run over it
        return
    if not link:
        return
    hint = "" if importlib.util.find_spec("bokeh") else " (install bokeh>=3.1 for the plots)"
    echo(f"Dask dashboard: {link}{hint}")


@contextlib.contextmanager
def dask_client(
    scheduler: str | None = None,
    cluster: str | None = None,
    cluster_config: str | Path | None = None,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | None = None,
    processes: bool = True,
    adaptive: bool = False,
    connect_timeout: float | None = None,
    echo: Callable[[str], None] = print,
) -> Iterator[Client]:
    """A Dask client on the requested cluster; everything started here is closed on exit.

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler (``tcp://host:8786``) or path to the JSON file
        written by ``dask scheduler --scheduler-file``. Excludes the other sizing options.
    cluster : {"local", "slurm", "pbs", "kubernetes"}, optional
        Cluster to start; default ``"local"`` (when ``scheduler`` is not given).
    cluster_config : str or Path, optional
        YAML file in Dask's configuration layout (``jobqueue.slurm.*``, ``jobqueue.pbs.*``,
        ``kubernetes.*``, ``distributed.*``), applied while the client is open.
    n_workers : int, optional
        Number of Dask workers. Local default: one per core. SLURM/PBS: rounded up to
        whole jobs (default one job). Kubernetes: worker pods (default 1). With
        ``adaptive`` it is the upper bound.
    threads_per_worker : int, optional
        Threads per worker (local default 1, otherwise from the configuration).
    memory_limit : str, optional
        Memory limit per worker, e.g. ``"2GiB"``.
    processes : bool
        Local cluster only: workers as processes (default) or as threads.
    adaptive : bool
        Let the cluster add and remove workers with the load, up to ``n_workers``.
    connect_timeout : float, optional
        Seconds to wait for ``scheduler`` (default ``distributed.comm.timeouts.connect``).
    echo : callable
        Receives progress lines (the dashboard link, the job layout).

    Yields
    ------
    distributed.Client
        Connected client; the client, and the cluster if this function started it,
        are closed when the block ends, however it ends.

    Raises
    ------
    ClusterSetupError
        Conflicting options, bad sizes or configuration, or a missing optional package
        (:class:`MissingClusterDependencyError`).
    SchedulerConnectionError
        If ``scheduler`` does not answer within the timeout.
    """
    kind = cluster
    if kind is not None and kind not in CLUSTER_KINDS:
        raise ClusterSetupError(f"unknown cluster type {kind!r}; expected one of {', '.join(CLUSTER_KINDS)}")
    if scheduler is not None:
        if kind is not None:
            raise ClusterSetupError(
                f"--scheduler connects to a running cluster and --cluster {kind} starts a new one; "
                "give only one of them"
            )
        sizing = {
            "--n-workers": n_workers,
            "--threads-per-worker": threads_per_worker,
            "--memory-limit": memory_limit,
            "--adaptive": adaptive or None,
        }
        given = [name for name, value in sizing.items() if value is not None]
        if given:
            raise ClusterSetupError(
                f"{', '.join(given)} size workers that lamost-mdwarf starts; with --scheduler "
                f"the workers already exist, so drop {'it' if len(given) == 1 else 'them'}"
            )
    kind = kind or "local"
    if adaptive and kind != "local" and n_workers is None:
        raise ClusterSetupError("--adaptive needs --n-workers as the largest number of workers")
    if n_workers is not None and n_workers < 1:
        raise ClusterSetupError(f"number of workers must be >= 1, got {n_workers}")

    with applied_cluster_config(cluster_config), contextlib.ExitStack() as stack:
        if scheduler is not None:
            client = stack.enter_context(_connect(scheduler, connect_timeout))
            echo(f"connected to the Dask scheduler at {client.scheduler.address}")
        else:
            started = stack.enter_context(
                create_cluster(kind, n_workers, threads_per_worker, memory_limit, processes, echo)
            )
            if kind in _JOBQUEUE_CLASSES:
                per_job = jobqueue_worker_layout(kind, threads_per_worker, memory_limit)["processes"]
                _scale(started, kind, n_workers, adaptive, per_job, echo)
            elif adaptive:
                _scale(started, kind, n_workers or dask.system.CPU_COUNT, adaptive, 1, echo)
            client = stack.enter_context(Client(started))
            if kind == "local":
                echo(f"local Dask cluster: {cluster_resources(client).describe()}")
        _echo_dashboard(client, echo)
        yield client


# --------------------------------------------------------------------------- resources


def _scheduler_workers(client: Client) -> dict[str, dict[str, Any]]:
    """Worker records from the scheduler, all of them."""
    try:
        info = client.scheduler_info(n_workers=-1)
    except TypeError:  # distributed < 2025.4 has no n_workers and returns every worker
        info = client.scheduler_info()
    return dict(info.get("workers", {}))


def cluster_resources(client: Client, timeout: float | None = None) -> ClusterResources:
    """Workers, threads and per-worker memory limit of a connected client.

    Waits for the first worker when none is connected yet (batch jobs may still be
    queued).

    Parameters
    ----------
    client : distributed.Client
        Connected client.
    timeout : float, optional
        Seconds to wait for a first worker; None waits as long as it takes.

    Returns
    -------
    ClusterResources
        Counts and the smallest per-worker memory limit (bytes) of the current workers.

    Raises
    ------
    ClusterSetupError
        If no worker connects within ``timeout``.
    """
    workers = _scheduler_workers(client)
    if not workers:
        try:
            client.wait_for_workers(1, timeout=timeout)
        except TimeoutError as error:
            raise ClusterSetupError(
                f"no Dask worker connected to {client.scheduler.address} within {timeout:g} s; "
                "check that worker jobs or pods started (squeue / qstat / kubectl get pods) "
                "and can reach the scheduler"
            ) from error
        workers = _scheduler_workers(client)
    threads = [int(worker.get("nthreads", 1)) for worker in workers.values()]
    limits = [int(worker.get("memory_limit") or 0) for worker in workers.values()]
    positive_limits = [limit for limit in limits if limit > 0]
    return ClusterResources(
        n_workers=len(workers),
        total_threads=sum(threads),
        threads_per_worker=min(threads),
        memory_limit_per_worker=min(positive_limits) if positive_limits else None,
    )


def worker_memory_limit(client: Client, timeout: float | None = None) -> int | None:
    """Smallest per-worker memory limit in bytes (None when workers have no limit).

    Use it to size chunks that must fit in one worker's memory.

    Parameters
    ----------
    client : distributed.Client
        Connected client.
    timeout : float, optional
        Seconds to wait for a first worker; None waits as long as it takes.

    Returns
    -------
    int or None
        Bytes, or None if no worker has a memory limit.
    """
    return cluster_resources(client, timeout=timeout).memory_limit_per_worker


# --------------------------------------------------------------------------- click

_Command = TypeVar("_Command", bound=Callable[..., Any])


def cluster_options(command: _Command) -> _Command:
    """Add the shared cluster options to a click command.

    The command receives the keyword arguments named in :data:`CLUSTER_OPTION_NAMES`;
    pass them to :func:`dask_client_from_options`.

    Options
    -------
    ``--scheduler ADDRESS``, ``--cluster [local|slurm|pbs|kubernetes]``,
    ``--cluster-config PATH``, ``--n-workers INT``, ``--threads-per-worker INT``,
    ``--memory-limit SIZE``, ``--adaptive``.
    """
    options = [
        click.option(
            "--scheduler",
            metavar="ADDRESS",
            default=None,
            help="Use a running Dask scheduler (tcp://host:8786, or the JSON file of "
            "'dask scheduler --scheduler-file') instead of starting a cluster.",
        ),
        click.option(
            "--cluster",
            type=click.Choice(CLUSTER_KINDS),
            default=None,
            help="Cluster to start: local (default; one worker per core), slurm or pbs "
            "(workers are batch jobs; needs the [hpc] extra), kubernetes (needs the "
            "[kubernetes] extra and the dask-kubernetes operator).",
        ),
        click.option(
            "--cluster-config",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            default=None,
            help="YAML with Dask settings: jobqueue.slurm.*, jobqueue.pbs.*, kubernetes.*, "
            "distributed.* (see deploy/jobqueue.yaml).",
        ),
        click.option(
            "--n-workers",
            type=click.IntRange(min=1),
            default=None,
            help="Number of Dask workers (local: cores; slurm/pbs: one job's worth; "
            "rounded up to whole jobs). Upper bound with --adaptive.",
        ),
        click.option(
            "--threads-per-worker",
            type=click.IntRange(min=1),
            default=None,
            help="Threads per worker (local default 1; otherwise from --cluster-config).",
        ),
        click.option(
            "--memory-limit",
            metavar="SIZE",
            default=None,
            help="Memory limit per worker, e.g. 2GiB; spectra chunks are sized to fit it.",
        ),
        click.option(
            "--adaptive",
            is_flag=True,
            default=False,
            help="Add and remove workers with the load, up to --n-workers.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@contextlib.contextmanager
def dask_client_from_options(
    echo: Callable[[str], None] = click.echo, **options: Any
) -> Iterator[Client]:
    """:func:`dask_client` from the keyword arguments of :func:`cluster_options`.

    Setup problems are raised as :class:`click.ClickException` so the command line
    shows the message without a traceback; errors from inside the block pass unchanged.

    Parameters
    ----------
    echo : callable
        Progress output (default :func:`click.echo`).
    **options
        ``scheduler``, ``cluster``, ``cluster_config``, ``n_workers``,
        ``threads_per_worker``, ``memory_limit``, ``adaptive``.

    Yields
    ------
    distributed.Client
    """
    unknown = sorted(set(options) - set(CLUSTER_OPTION_NAMES))
    if unknown:
        raise TypeError(f"unexpected cluster option(s): {', '.join(unknown)}")
    with contextlib.ExitStack() as stack:
        try:
            client = stack.enter_context(dask_client(echo=echo, **options))
        except ClusterSetupError as error:
            raise click.ClickException(str(error)) from error
        yield client
