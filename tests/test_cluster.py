"""lamost_mdwarf.cluster: where the work runs (local, existing scheduler, SLURM/PBS, Kubernetes)."""
from __future__ import annotations

import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path

import click
import dask
import pytest
import yaml
from click.testing import CliRunner
from distributed.core import Status

from lamost_mdwarf import cluster as cluster_module
from lamost_mdwarf.cluster import (
    CLUSTER_OPTION_NAMES,
    ClusterSetupError,
    MissingClusterDependencyError,
    SchedulerConnectionError,
    applied_cluster_config,
    cluster_options,
    cluster_resources,
    create_cluster,
    dask_client,
    dask_client_from_options,
    jobqueue_worker_layout,
    kubernetes_cluster_spec,
    load_cluster_config,
    worker_memory_limit,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _quiet(_: str) -> None:
    """Swallow progress lines."""


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _write_yaml(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content))
    return path


def _daskcluster_schema() -> dict:
    """openAPIV3Schema of the DaskCluster CRD shipped in the dask-kubernetes wheel."""
    import dask_kubernetes

    crd_path = (
        Path(dask_kubernetes.__file__).parent
        / "operator/deployment/helm/dask-kubernetes-operator/crds/daskcluster.yaml"
    )
    crd = yaml.safe_load(crd_path.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


# --------------------------------------------------------------------------- local


def test_local_cluster_has_requested_workers_and_closes():
    lines: list[str] = []
    with dask_client(n_workers=2, memory_limit="300MiB", processes=False, echo=lines.append) as client:
        resources = cluster_resources(client)
        assert resources.n_workers == 2
        assert resources.threads_per_worker == 1
        assert resources.total_threads == 2
        assert resources.memory_limit_per_worker == 300 * 2**20
        assert worker_memory_limit(client) == 300 * 2**20
        assert client.submit(sum, [1, 2, 3]).result() == 6
        local_cluster = client.cluster
    assert client.status == "closed"
    assert local_cluster.status == Status.closed
    assert any("2 workers x 1 thread, 300.00 MiB per worker" in line for line in lines)


@pytest.mark.parametrize("interruption", [RuntimeError("pipeline failed"), KeyboardInterrupt()])
def test_local_cluster_closes_when_the_block_fails(interruption):
    with pytest.raises(type(interruption)):
        with dask_client(n_workers=1, processes=False, echo=_quiet) as client:
            local_cluster = client.cluster
            raise interruption
    assert client.status == "closed"
    assert local_cluster.status == Status.closed


def test_local_threads_per_worker_is_applied():
    with dask_client(n_workers=1, threads_per_worker=3, processes=False, echo=_quiet) as client:
        assert cluster_resources(client).total_threads == 3


def test_connecting_to_an_address_without_scheduler_fails_fast_and_names_it():
    address = f"tcp://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    with pytest.raises(SchedulerConnectionError) as caught:
        with dask_client(scheduler=address, connect_timeout=1.0, echo=_quiet):
            pass  # pragma: no cover - the connection must fail
    assert time.monotonic() - started < 15
    assert address in str(caught.value)
    assert "8786" in str(caught.value)


def test_connects_to_an_existing_scheduler_and_leaves_it_running():
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, processes=False, memory_limit="200MiB") as running:
        with dask_client(scheduler=running.scheduler_address, echo=_quiet) as client:
            assert cluster_resources(client).memory_limit_per_worker == 200 * 2**20
        assert running.status == Status.running


def test_missing_scheduler_file_is_reported(tmp_path):
    with pytest.raises(ClusterSetupError, match="scheduler file .*does not exist"):
        with dask_client(scheduler=str(tmp_path / "scheduler.json"), echo=_quiet):
            pass  # pragma: no cover


@pytest.mark.parametrize(
    "options, message",
    [
        ({"scheduler": "tcp://127.0.0.1:8786", "cluster": "slurm"}, "give only one"),
        ({"scheduler": "tcp://127.0.0.1:8786", "n_workers": 4}, "--n-workers"),
        ({"scheduler": "tcp://127.0.0.1:8786", "memory_limit": "2GiB"}, "--memory-limit"),
        ({"cluster": "yarn"}, "unknown cluster type"),
        ({"cluster": "slurm", "adaptive": True}, "--adaptive needs --n-workers"),
        ({"memory_limit": "two gigs", "processes": False}, "not a size"),
    ],
)
def test_conflicting_or_bad_options_are_rejected_before_starting(options, message):
    with pytest.raises(ClusterSetupError, match=message):
        with dask_client(echo=_quiet, **options):
            pass  # pragma: no cover


# --------------------------------------------------------------------------- config


def test_cluster_config_is_merged_key_by_key_and_restored(tmp_path):
    path = _write_yaml(
        tmp_path / "site.yaml",
        {
            "jobqueue": {"slurm": {"cores": 5, "walltime": "01:23:00"}},
            "distributed": {"scheduler": {"worker-ttl": "7 minutes"}},
        },
    )
    before = dask.config.get("distributed.scheduler.worker-ttl")
    with applied_cluster_config(path):
        assert dask.config.get("jobqueue.slurm.cores") == 5
        assert dask.config.get("jobqueue.slurm.walltime") == "01:23:00"
        # untouched defaults of the same section survive
        assert dask.config.get("jobqueue.slurm.death-timeout") == 60
        assert dask.config.get("distributed.scheduler.worker-ttl") == "7 minutes"
    assert dask.config.get("distributed.scheduler.worker-ttl") == before
    assert dask.config.get("jobqueue.slurm.cores") is None


@pytest.mark.parametrize("content", ["- a\n- list\n", "jobqueue: [unclosed\n"])
def test_bad_cluster_config_files_are_reported(tmp_path, content):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ClusterSetupError, match="bad.yaml"):
        load_cluster_config(path)
    with pytest.raises(ClusterSetupError, match="does not exist"):
        load_cluster_config(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- SLURM / PBS


def test_yaml_config_reaches_the_slurm_job_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _write_yaml(
        tmp_path / "jobqueue.yaml",
        {
            "jobqueue": {
                "slurm": {
                    "cores": 6,
                    "memory": "12GiB",
                    "processes": 3,
                    "walltime": "02:34:00",
                    "queue": "astro",
                    "job-script-prologue": ["source /opt/envs/mdwarf/bin/activate"],
                }
            }
        },
    )
    with applied_cluster_config(config):
        slurm = create_cluster("slurm", echo=_quiet)
        try:
            script = slurm.job_script()
        finally:
            slurm.close()
    assert "#SBATCH --cpus-per-task=6" in script
    assert "#SBATCH --mem=12G" in script
    assert "#SBATCH -t 02:34:00" in script
    assert "#SBATCH -p astro" in script
    assert "source /opt/envs/mdwarf/bin/activate" in script
    assert "--nworkers 3" in script and "--nthreads 2" in script
    assert "--memory-limit 4.00GiB" in script


def test_command_line_sizing_overrides_the_job_layout(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _write_yaml(
        tmp_path / "jq.yaml", {"jobqueue": {"pbs": {"cores": 8, "memory": "16GiB", "walltime": "00:45:00"}}}
    )
    with applied_cluster_config(config):
        assert jobqueue_worker_layout("pbs") == {"cores": 8, "processes": 8, "memory": 16 * 2**30}
        assert jobqueue_worker_layout("pbs", threads_per_worker=2, memory_limit="3GiB") == {
            "cores": 8,
            "processes": 4,
            "memory": 12 * 2**30,
        }
        pbs = create_cluster("pbs", threads_per_worker=2, memory_limit="3GiB", echo=_quiet)
        try:
            script = pbs.job_script()
        finally:
            pbs.close()
    assert "#PBS -l select=1:ncpus=8:mem=12GB" in script
    assert "#PBS -l walltime=00:45:00" in script
    assert "--nthreads 2" in script and "--nworkers 4" in script and "--memory-limit 3.00GiB" in script


def test_missing_job_size_names_the_yaml_key():
    with pytest.raises(ClusterSetupError, match=r"jobqueue\.slurm\.cores is not set"):
        jobqueue_worker_layout("slurm")
    with dask.config.set({"jobqueue.slurm.cores": 4, "jobqueue.slurm.memory": None}):
        with pytest.raises(ClusterSetupError, match=r"jobqueue\.slurm\.memory is not set"):
            jobqueue_worker_layout("slurm")
        assert jobqueue_worker_layout("slurm", memory_limit="1GiB")["memory"] == 4 * 2**30


FAKE_SBATCH = """\
#!/usr/bin/env bash
# Stand-in for sbatch: keep a copy of the job script and run it in the background.
set -eu
n=$(ls "$FAKE_SLURM_DIR" | grep -c '^job-.*\\.sh$' || true)
cp "$1" "$FAKE_SLURM_DIR/job-$n.sh"
setsid bash "$FAKE_SLURM_DIR/job-$n.sh" > "$FAKE_SLURM_DIR/job-$n.log" 2>&1 < /dev/null &
echo "$!" >> "$FAKE_SLURM_DIR/pids"
echo "Submitted batch job $!"
"""

FAKE_SCANCEL = """\
#!/usr/bin/env bash
# Stand-in for scancel: stop the process group that fake sbatch started.
for job in "$@"; do
    echo "$job" >> "$FAKE_SLURM_DIR/cancelled"
    kill -TERM -- "-$job" 2> /dev/null || true
done
"""


def test_slurm_workers_are_submitted_connect_and_are_cancelled_on_exit(tmp_path, monkeypatch):
    """End to end with a stand-in sbatch that runs the job script on this machine."""
    bin_dir = tmp_path / "bin"
    jobs_dir = tmp_path / "jobs"
    bin_dir.mkdir()
    jobs_dir.mkdir()
    for name, body in (("sbatch", FAKE_SBATCH), ("scancel", FAKE_SCANCEL)):
        tool = bin_dir / name
        tool.write_text(body)
        tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(jobs_dir))
    monkeypatch.chdir(tmp_path)
    config = _write_yaml(
        tmp_path / "jobqueue.yaml",
        {
            "jobqueue": {
                "slurm": {
                    "cores": 1,
                    "memory": "1GiB",
                    "walltime": "00:10:00",
                    "death-timeout": 30,
                    "job-script-prologue": ["export LAMOST_PROLOGUE_RAN=yes"],
                }
            }
        },
    )
    lines: list[str] = []
    with dask_client(
        cluster="slurm", cluster_config=config, n_workers=1, memory_limit="700MiB", echo=lines.append
    ) as client:
        resources = cluster_resources(client, timeout=90)
        assert resources.n_workers == 1
        assert resources.memory_limit_per_worker == 700 * 2**20
        assert client.submit(lambda: os.environ.get("LAMOST_PROLOGUE_RAN")).result(timeout=30) == "yes"
    job_script = (jobs_dir / "job-0.sh").read_text()
    assert "#SBATCH --mem=700M" in job_script
    assert "#SBATCH -t 00:10:00" in job_script
    pid = int((jobs_dir / "pids").read_text().split()[0])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (jobs_dir / "cancelled").exists() is False:
        time.sleep(0.1)
    assert (jobs_dir / "cancelled").read_text().split() == [str(pid)]
    assert any("submitted 1 worker job(s)" in line for line in lines)
    # the job's process group ends (scancel stand-in plus the closing scheduler)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:  # pragma: no cover - clean up what this test started, then fail
        os.killpg(pid, signal.SIGKILL)
        pytest.fail("the worker job kept running after the client closed")


# --------------------------------------------------------------------------- optional deps


def test_missing_dask_jobqueue_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)
    with pytest.raises(MissingClusterDependencyError, match=r"pip install 'lamost-mdwarf\[hpc\]'") as caught:
        create_cluster("slurm", echo=_quiet)
    assert isinstance(caught.value, ImportError)
    assert "dask-jobqueue" in str(caught.value)


def test_missing_dask_kubernetes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_kubernetes.operator", None)
    with pytest.raises(MissingClusterDependencyError, match=r"lamost-mdwarf\[kubernetes\]"):
        with dask_client(cluster="kubernetes", echo=_quiet):
            pass  # pragma: no cover


def test_importing_dask_jobqueue_keeps_ctrl_c_a_keyboard_interrupt(monkeypatch):
    for name in [module for module in sys.modules if module.split(".")[0] == "dask_jobqueue"]:
        monkeypatch.delitem(sys.modules, name)
    before = signal.getsignal(signal.SIGINT)
    try:
        cluster_module._import_optional("dask_jobqueue", "hpc", "--cluster slurm")
        assert signal.getsignal(signal.SIGINT) is before
    finally:
        signal.signal(signal.SIGINT, before)


# --------------------------------------------------------------------------- Kubernetes


@pytest.fixture
def kubernetes_defaults():
    """Register dask-kubernetes' config defaults before a test sets ``kubernetes.*`` keys.

    Imported inside a ``dask.config.set`` block, the package would add its defaults to
    the temporary section, and they would vanish with it.
    """
    return pytest.importorskip("dask_kubernetes.operator")


def test_generated_kubernetes_spec_validates_and_matches_memory_limit(kubernetes_defaults):
    jsonschema = pytest.importorskip("jsonschema")
    settings = {"kubernetes.image": "registry.example.org/lamost-mdwarf:test", "kubernetes.name": "mdwarf-{uuid}"}
    with dask.config.set(settings):
        spec = kubernetes_cluster_spec(n_workers=3, threads_per_worker=2, memory_limit="4GiB")
    jsonschema.validate(spec, _daskcluster_schema())
    worker = spec["spec"]["worker"]
    container = worker["spec"]["containers"][0]
    args = container["args"]
    assert worker["replicas"] == 3
    assert args[:2] == ["dask", "worker"]
    assert args[args.index("--nthreads") + 1] == "2"
    assert int(args[args.index("--memory-limit") + 1]) == 4 * 2**30
    assert container["resources"]["limits"]["memory"] == "4Gi"
    assert container["resources"]["requests"]["memory"] == "4Gi"
    assert spec["spec"]["scheduler"]["spec"]["containers"][0]["args"][:2] == ["dask", "scheduler"]
    assert spec["metadata"]["name"].startswith("mdwarf-")


def test_custom_daskcluster_manifest_gets_the_command_line_sizing(monkeypatch):
    jsonschema = pytest.importorskip("jsonschema")
    monkeypatch.chdir(REPO_ROOT)
    with applied_cluster_config("deploy/kubernetes/dask-config.yaml"):
        spec = kubernetes_cluster_spec(n_workers=5, memory_limit="1536MiB")
    jsonschema.validate(spec, _daskcluster_schema())
    container = spec["spec"]["worker"]["spec"]["containers"][0]
    assert spec["spec"]["worker"]["replicas"] == 5
    assert container["args"].count("--memory-limit") == 1
    assert int(container["args"][container["args"].index("--memory-limit") + 1]) == 1536 * 2**20
    assert container["resources"]["limits"]["memory"] == "1536Mi"
    assert container["volumeMounts"][0]["mountPath"] == "/data"  # the manifest's volumes are kept


def test_kubernetes_cluster_is_created_from_the_spec(monkeypatch, kubernetes_defaults):
    operator = kubernetes_defaults
    created: dict = {}

    class RecordingKubeCluster:
        def __init__(self, **kwargs):
            created.update(kwargs)

    monkeypatch.setattr(operator, "KubeCluster", RecordingKubeCluster)
    lines: list[str] = []
    with dask.config.set({"kubernetes.namespace": "lamost", "kubernetes.image": "ghcr.io/dask/dask:latest"}):
        create_cluster("kubernetes", n_workers=2, memory_limit="2GiB", echo=lines.append)
    assert created["namespace"] == "lamost"
    assert created["custom_cluster_spec"]["spec"]["worker"]["replicas"] == 2
    assert any("does not contain lamost-mdwarf" in line for line in lines)


# --------------------------------------------------------------------------- click


@click.command()
@cluster_options
def _probe_command(**options):
    """A command that reports the cluster it got."""
    with dask_client_from_options(**options) as client:
        click.echo(f"workers={cluster_resources(client).n_workers}")


def test_cluster_options_cover_the_documented_names():
    names = {parameter.name for parameter in _probe_command.params}
    assert names == set(CLUSTER_OPTION_NAMES)
    help_text = CliRunner().invoke(_probe_command, ["--help"]).output
    for name in ("scheduler", "cluster", "cluster-config", "n-workers", "memory-limit", "threads-per-worker"):
        assert f"--{name}" in help_text
    assert "local|slurm|pbs|kubernetes" in help_text


def test_cluster_options_start_a_local_cluster_through_click():
    result = CliRunner().invoke(_probe_command, ["--n-workers", "1", "--memory-limit", "400MiB"])
    assert result.exit_code == 0, result.output
    assert "workers=1" in result.output
    assert "400.00 MiB per worker" in result.output


def test_cluster_option_errors_become_click_errors():
    result = CliRunner().invoke(_probe_command, ["--scheduler", "tcp://127.0.0.1:8786", "--cluster", "pbs"])
    assert result.exit_code == 1
    assert "Error: --scheduler connects to a running cluster" in result.output
    assert "Traceback" not in result.output


def test_dask_client_from_options_rejects_unknown_names():
    with pytest.raises(TypeError, match="spectra"):
        with dask_client_from_options(spectra="x"):
            pass  # pragma: no cover
