"""deploy/: batch scripts, dask-jobqueue config, SLURM runner entry, container image and
Kubernetes manifests, checked without a scheduler system, Docker or Kubernetes."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import dask
import pytest
import yaml
from dask.utils import parse_bytes

from lamost_mdwarf.cluster import applied_cluster_config

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY = REPO_ROOT / "deploy"
SHELL_SCRIPTS = sorted(
    path
    for path in DEPLOY.rglob("*")
    if path.is_file()
    and (path.suffix in {".sh", ".sbatch", ".pbs"} or path.read_bytes().startswith(b"#!/usr/bin/env bash"))
)
PIPELINE_ENV = {"SPECTRA": "/data/lamost dr10/fits", "LABELS": "/data/labels.csv", "WORKDIR": "/scratch/run 1"}


def _load_yaml(relative: str):
    return yaml.safe_load((DEPLOY / relative).read_text())


def _daskcluster_schema() -> dict:
    """openAPIV3Schema of the DaskCluster CRD shipped in the dask-kubernetes wheel."""
    import dask_kubernetes

    crd_path = (
        Path(dask_kubernetes.__file__).parent
        / "operator/deployment/helm/dask-kubernetes-operator/crds/daskcluster.yaml"
    )
    crd = yaml.safe_load(crd_path.read_text())
    assert crd["spec"]["names"]["kind"] == "DaskCluster"
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _kubernetes_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (4Gi, 512Mi, 1G, 1000) in bytes."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", quantity)
    assert match, f"not a memory quantity: {quantity}"
    factors = {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    factors.update({"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12})
    return int(match.group(1)) * factors[match.group(2)]


def _fake_tools(directory: Path, names: list[str]) -> Path:
    """Executables that print their own name and arguments, one per line."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in names:
        tool = directory / name
        tool.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "{name}" "$@"\n')
        tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    return directory


def _fake_environment(tmp_path: Path) -> dict[str, str]:
    """Environment with stand-in tools first on PATH and an activatable fake virtualenv."""
    bin_dir = _fake_tools(tmp_path / "bin", ["lamost-mdwarf", "srun", "dask"])
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "activate").write_text("export LAMOST_FAKE_VENV_ACTIVE=1\n")
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),
        "LAMOST_MDWARF_ENV": str(venv),
    }


def _run_script(script: Path, env: dict[str, str], cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script)], env=env, cwd=cwd, capture_output=True, text=True, timeout=30)


# --------------------------------------------------------------------------- shell scripts


def test_deploy_has_the_expected_shell_scripts():
    names = {path.relative_to(DEPLOY).as_posix() for path in SHELL_SCRIPTS}
    expected = {"slurm/pipeline.sbatch", "slurm/pipeline_runner.sbatch", "pbs/pipeline.pbs", "docker-entrypoint.sh"}
    assert expected <= names


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda path: path.relative_to(DEPLOY).as_posix())
def test_shell_script_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "script, kind, submit_dir_variable",
    [("slurm/pipeline.sbatch", "slurm", "SLURM_SUBMIT_DIR"), ("pbs/pipeline.pbs", "pbs", "PBS_O_WORKDIR")],
)
def test_batch_script_runs_the_pipeline_with_the_cluster_options(tmp_path, script, kind, submit_dir_variable):
    env = {**_fake_environment(tmp_path), **PIPELINE_ENV, submit_dir_variable: str(REPO_ROOT), "MEMORY_LIMIT": "3GiB"}
    result = _run_script(DEPLOY / script, env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "lamost-mdwarf", "run",
        "--spectra", PIPELINE_ENV["SPECTRA"],
        "--labels", PIPELINE_ENV["LABELS"],
        "--workdir", PIPELINE_ENV["WORKDIR"],
        "--cluster", kind,
        "--cluster-config", "deploy/jobqueue.yaml",
        "--n-workers", "32",
        "--memory-limit", "3GiB",
    ]  # fmt: skip
    header = (DEPLOY / script).read_text()
    directive = "#SBATCH" if kind == "slurm" else "#PBS"
    assert re.search(rf"^{directive} .*(time|walltime)=24:00:00$", header, re.MULTILINE)


def test_batch_script_without_memory_limit_leaves_it_to_the_yaml(tmp_path):
    env = {**_fake_environment(tmp_path), **PIPELINE_ENV, "SLURM_SUBMIT_DIR": str(REPO_ROOT), "N_WORKERS": "64"}
    result = _run_script(DEPLOY / "slurm/pipeline.sbatch", env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    arguments = result.stdout.splitlines()
    assert "--memory-limit" not in arguments
    assert arguments[arguments.index("--n-workers") + 1] == "64"


def test_batch_script_names_a_missing_variable(tmp_path):
    env = {**_fake_environment(tmp_path), "SPECTRA": "/data", "WORKDIR": "/scratch"}
    result = _run_script(DEPLOY / "slurm/pipeline.sbatch", env, cwd=tmp_path)
    assert result.returncode != 0
    assert "LABELS" in result.stderr
    assert result.stdout == ""


def test_runner_batch_script_starts_the_entry_on_every_task(tmp_path):
    env = {**_fake_environment(tmp_path), **PIPELINE_ENV, "SLURM_SUBMIT_DIR": str(REPO_ROOT)}
    result = _run_script(DEPLOY / "slurm/pipeline_runner.sbatch", env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    arguments = result.stdout.splitlines()
    assert arguments[0] == "srun"
    entry = arguments.index("deploy/slurm/run_in_allocation.py")
    assert arguments[entry - 1] == "python"
    assert arguments[arguments.index("--scheduler-file") + 1] == "dask-scheduler-{job_id}.json"
    assert arguments[arguments.index("--") + 1 :] == [
        "run", "--spectra", PIPELINE_ENV["SPECTRA"], "--labels", PIPELINE_ENV["LABELS"],
        "--workdir", PIPELINE_ENV["WORKDIR"],
    ]  # fmt: skip
    assert (REPO_ROOT / arguments[entry]).is_file()


# --------------------------------------------------------------------------- jobqueue.yaml


def test_jobqueue_yaml_only_uses_keys_dask_jobqueue_knows():
    import dask_jobqueue

    defaults = yaml.safe_load((Path(dask_jobqueue.__file__).parent / "jobqueue.yaml").read_text())["jobqueue"]
    ours = _load_yaml("jobqueue.yaml")["jobqueue"]
    assert set(ours) == {"slurm", "pbs"}
    for kind, section in ours.items():
        unknown = set(section) - set(defaults[kind])
        assert not unknown, f"jobqueue.{kind} has keys dask-jobqueue does not read: {unknown}"


def test_jobqueue_yaml_builds_slurm_and_pbs_job_scripts(tmp_path, monkeypatch):
    import dask_jobqueue

    monkeypatch.chdir(tmp_path)  # log-directory is created relative to here
    with applied_cluster_config(DEPLOY / "jobqueue.yaml"):
        slurm = dask_jobqueue.SLURMCluster()
        pbs = dask_jobqueue.PBSCluster()
        try:
            slurm_script, pbs_script = slurm.job_script(), pbs.job_script()
        finally:
            slurm.close()
            pbs.close()
        memory_per_job = parse_bytes(dask.config.get("jobqueue.slurm.memory"))
    assert memory_per_job == 32 * 2**30
    slurm_lines = ("#SBATCH --cpus-per-task=8", "#SBATCH --mem=32G", "#SBATCH -t 04:00:00", "#SBATCH -J lamost-mdwarf-worker")
    for line in slurm_lines:
        assert line in slurm_script
    for line in ("#PBS -l select=1:ncpus=8:mem=32GB", "#PBS -l walltime=04:00:00", "#PBS -N lamost-mdwarf-worker"):
        assert line in pbs_script
    for script in (slurm_script, pbs_script):
        assert 'source "${LAMOST_MDWARF_ENV:-$HOME/.venvs/lamost-mdwarf}/bin/activate"' in script
        assert "--nworkers 8" in script and "--nthreads 1" in script and "--memory-limit 4.00GiB" in script
        assert "--local-directory ${TMPDIR:-/tmp}" in script
    assert (tmp_path / "dask-worker-logs").is_dir()


def test_jobqueue_yaml_distributed_settings_are_known_keys():
    ours = _load_yaml("jobqueue.yaml")["distributed"]
    assert dask.config.get("distributed.comm.timeouts.connect") is not None
    assert dask.config.get("distributed.scheduler.worker-ttl") is not None
    assert ours["comm"]["timeouts"]["connect"] == "60s"


# --------------------------------------------------------------------------- SLURM runner


def _load_runner_module():
    spec = importlib.util.spec_from_file_location("run_in_allocation", DEPLOY / "slurm/run_in_allocation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runner_splits_its_options_from_the_pipeline_arguments():
    runner = _load_runner_module()
    options, pipeline = runner.parse_arguments(
        ["--memory-limit", "3GiB", "--", "run", "--spectra", "a", "--labels", "b", "--workdir", "c"]
    )
    assert options.memory_limit == "3GiB"
    assert options.scheduler_file == "dask-scheduler-{job_id}.json"
    assert pipeline == ["run", "--spectra", "a", "--labels", "b", "--workdir", "c"]
    bad_command_lines = (
        ["run", "--spectra", "a"],
        ["--"],
        ["--", "run", "--scheduler", "tcp://x:1"],
        ["--", "run", "--cluster=slurm"],
    )
    for bad in bad_command_lines:
        with pytest.raises(SystemExit):
            runner.parse_arguments(bad)


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({"SLURM_MEM_PER_CPU": "4096", "SLURM_CPUS_PER_TASK": "2"}, "8192MiB"),
        ({"SLURM_MEM_PER_NODE": "64000", "SLURM_NTASKS_PER_NODE": "16"}, "4000MiB"),
        ({"SLURM_MEM_PER_NODE": "60000", "SLURM_TASKS_PER_NODE": "8(x2),6", "SLURM_NODEID": "2"}, "10000MiB"),
        ({"SLURM_CPUS_PER_TASK": "4"}, None),
    ],
)
def test_runner_reads_the_worker_memory_from_slurm(environ, expected):
    assert _load_runner_module().worker_memory_limit_from_slurm(environ) == expected


def test_runner_worker_options_follow_the_allocation(tmp_path):
    runner = _load_runner_module()
    options, _ = runner.parse_arguments(["--", "run"])
    environ = {"SLURM_CPUS_PER_TASK": "2", "SLURM_MEM_PER_CPU": "1000", "TMPDIR": str(tmp_path)}
    assert runner.worker_options(options, environ) == {
        "nthreads": 2,
        "memory_limit": "2000MiB",
        "local_directory": str(tmp_path),
    }


RUNNER_BOOTSTRAP = r"""
import json, runpy, sys, types
from pathlib import Path

record, script = Path(sys.argv[1]), sys.argv[2]
fake_cli = types.ModuleType("lamost_mdwarf.cli")


def main(args, standalone_mode=True, prog_name=None):
    # Stand-in for the lamost-mdwarf command line: compute on the scheduler it is given.
    from distributed import Client

    address = args[args.index("--scheduler") + 1]
    with Client(address, timeout=30) as client:
        workers = client.scheduler_info(n_workers=-1)["workers"].values()
        answer = client.submit(lambda value: value + 1, 41).result()
    record.write_text(json.dumps({
        "args": list(args),
        "standalone_mode": standalone_mode,
        "answer": answer,
        "memory_limits": [worker["memory_limit"] for worker in workers],
        "nthreads": [worker["nthreads"] for worker in workers],
    }))
    return 0


fake_cli.main = main
sys.modules["lamost_mdwarf.cli"] = fake_cli
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
"""


def test_runner_runs_scheduler_client_and_worker_as_slurm_tasks(tmp_path):
    """Three local processes with the SLURM_* variables srun would give three tasks."""
    record = tmp_path / "client.json"
    bootstrap = tmp_path / "bootstrap.py"
    bootstrap.write_text(RUNNER_BOOTSTRAP)
    pipeline = ["run", "--spectra", "s", "--labels", "l.csv", "--workdir", "w"]
    tasks = []
    for rank in range(3):
        env = {
            **os.environ,
            "SLURM_PROCID": str(rank),
            "SLURM_NTASKS": "3",
            "SLURM_JOB_ID": "4242",
            "SLURM_CPUS_PER_TASK": "1",
            "SLURM_MEM_PER_CPU": "600",
            "TMPDIR": str(tmp_path),
        }
        command = [sys.executable, str(bootstrap), str(record), str(DEPLOY / "slurm/run_in_allocation.py"),
                   "--worker-wait-timeout", "60", "--", *pipeline]  # fmt: skip
        tasks.append(
            subprocess.Popen(
                command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = []
    try:
        for task in tasks:
            outputs.append(task.communicate(timeout=120)[0])
    finally:
        for task in tasks:
            if task.poll() is None:  # pragma: no cover - only on a hang
                task.kill()
                task.wait()
    assert tasks[1].returncode == 0, outputs[1]
    result = json.loads(record.read_text())
    assert result["answer"] == 42
    assert result["standalone_mode"] is False
    assert result["args"][:-2] == pipeline
    assert result["args"][-2] == "--scheduler" and result["args"][-1].startswith("tcp://")
    assert result["memory_limits"] == [600 * 2**20]
    assert result["nthreads"] == [1]
    # the scheduler (task 0) and the worker (task 2) end with the client, without error
    assert [task.returncode for task in tasks] == [0, 0, 0], outputs
    assert "Dask scheduler tcp://" in outputs[1]


# --------------------------------------------------------------------------- container image


def test_dockerfile_installs_this_package_with_the_cluster_extras():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    instructions = [
        line.strip() for line in dockerfile.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    assert instructions[0] == "FROM python:3.11-slim"
    assert "COPY . ." in instructions
    copy_index = instructions.index("COPY . .")
    install = next(index for index, line in enumerate(instructions) if 'pip install ".[hpc,kubernetes]"' in line)
    assert install > copy_index
    entrypoint = next(line for line in instructions if line.startswith("ENTRYPOINT"))
    assert json.loads(entrypoint.removeprefix("ENTRYPOINT").strip())[-1] == "lamost-mdwarf-entrypoint"
    assert "deploy/docker-entrypoint.sh /usr/local/bin/lamost-mdwarf-entrypoint" in dockerfile
    assert "lamost-mdwarf --help" in dockerfile  # the build fails if the command does not start


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""

    def to_regex(pattern: str) -> re.Pattern:
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        regex = re.sub(r"\\\[(.*?)\\\]", lambda m: "[" + m.group(1) + "]", regex).replace(r"\?", "[^/]")
        return re.compile(regex)

    parts = path.split("/")
    candidates = ["/".join(parts[: length + 1]) for length in range(len(parts))]
    excluded = False
    for raw in patterns:
        negated = raw.startswith("!")
        pattern = raw[1:] if negated else raw
        regex = to_regex(pattern.strip("/"))
        if any(regex.fullmatch(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def test_docker_build_context_holds_the_package_and_no_data():
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    package_files = [path.relative_to(REPO_ROOT).as_posix() for path in (REPO_ROOT / "lamost_mdwarf").rglob("*.py")]
    assert package_files
    for needed in ["pyproject.toml", "README.md", "deploy/docker-entrypoint.sh", *package_files]:
        assert not _dockerignore_excludes(patterns, needed), needed
    for unwanted in [
        ".git/config",
        "tests/test_cluster.py",
        "data/spec-55859-F5902_sp01-001.fits.gz",
        "runs/dr10/survey.zarr/zarr.json",
        "lamost_mdwarf/__pycache__/cluster.cpython-311.pyc",
        "lamost_mdwarf.egg-info/PKG-INFO",
    ]:
        assert _dockerignore_excludes(patterns, unwanted), unwanted


@pytest.mark.parametrize(
    "arguments, expected",
    [
        (["run", "--workdir", "/w"], ["lamost-mdwarf", "run", "--workdir", "/w"]),
        (["lamost-mdwarf", "run"], ["lamost-mdwarf", "run"]),
        (["dask-worker", "tcp://s:8786", "--nthreads", "1"], ["dask", "worker", "tcp://s:8786", "--nthreads", "1"]),
        (["dask-scheduler", "--host", "0.0.0.0"], ["dask", "scheduler", "--host", "0.0.0.0"]),
        (["dask", "worker", "tcp://s:8786"], ["dask", "worker", "tcp://s:8786"]),
        ([], ["lamost-mdwarf"]),
    ],
)
def test_container_entrypoint_dispatch(tmp_path, arguments, expected):
    env = _fake_environment(tmp_path)
    result = subprocess.run(
        ["bash", str(DEPLOY / "docker-entrypoint.sh"), *arguments], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == expected


# --------------------------------------------------------------------------- Kubernetes


def test_daskcluster_manifest_validates_against_the_operator_crd():
    jsonschema = pytest.importorskip("jsonschema")
    manifest = _load_yaml("kubernetes/daskcluster.yaml")
    assert manifest["apiVersion"] == "kubernetes.dask.org/v1"
    assert manifest["kind"] == "DaskCluster"
    jsonschema.validate(manifest, _daskcluster_schema())


def test_daskcluster_worker_memory_limit_matches_the_pod_limit():
    manifest = _load_yaml("kubernetes/daskcluster.yaml")
    container = manifest["spec"]["worker"]["spec"]["containers"][0]
    args = container["args"]
    assert args[:2] == ["dask", "worker"]
    dask_limit = parse_bytes(args[args.index("--memory-limit") + 1])
    assert dask_limit == _kubernetes_bytes(container["resources"]["limits"]["memory"])
    assert dask_limit == _kubernetes_bytes(container["resources"]["requests"]["memory"])
    assert args[args.index("--nthreads") + 1] == container["resources"]["limits"]["cpu"]
    service = manifest["spec"]["scheduler"]["service"]
    assert service["selector"]["dask.org/cluster-name"] == manifest["metadata"]["name"]
    assert {port["port"] for port in service["ports"]} == {8786, 8787}


def test_pipeline_job_runs_lamost_mdwarf_against_the_daskcluster_scheduler():
    cluster = _load_yaml("kubernetes/daskcluster.yaml")
    job = _load_yaml("kubernetes/pipeline-job.yaml")
    pvc = _load_yaml("kubernetes/pvc.yaml")
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    container = pod["containers"][0]
    args = container["args"]
    assert args[:2] == ["lamost-mdwarf", "run"]
    for option in ("--spectra", "--labels", "--workdir"):
        assert args[args.index(option) + 1].startswith("/data/")
    scheduler = args[args.index("--scheduler") + 1]
    service_address = rf"tcp://{cluster['metadata']['name']}-scheduler\.[a-z0-9-]+\.svc\.cluster\.local:8786"
    assert re.fullmatch(service_address, scheduler)
    assert container["image"] == cluster["spec"]["worker"]["spec"]["containers"][0]["image"]
    assert container["image"] == cluster["spec"]["scheduler"]["spec"]["containers"][0]["image"]
    # the workers and the Job see the same data at the same path
    claim = pvc["metadata"]["name"]
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    worker_pod = cluster["spec"]["worker"]["spec"]
    pods_and_mounts = ((pod, container["volumeMounts"]), (worker_pod, worker_pod["containers"][0]["volumeMounts"]))
    for pod_spec, mounts in pods_and_mounts:
        volume = next(v for v in pod_spec["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName") == claim)
        assert {"name": volume["name"], "mountPath": "/data"} in mounts
    text = (DEPLOY / "kubernetes/pipeline-job.yaml").read_text()
    assert "s3://" in text  # the object-store alternative is documented


def test_make_cluster_spec_for_our_image_validates_against_the_crd():
    jsonschema = pytest.importorskip("jsonschema")
    from dask_kubernetes.operator import make_cluster_spec

    image = _load_yaml("kubernetes/daskcluster.yaml")["spec"]["worker"]["spec"]["containers"][0]["image"]
    spec = make_cluster_spec(
        name="lamost-mdwarf",
        image=image,
        n_workers=8,
        resources={"requests": {"memory": "4Gi"}, "limits": {"memory": "4Gi"}},
        env={"OMP_NUM_THREADS": "1"},
    )
    jsonschema.validate(spec, _daskcluster_schema())
    assert spec["spec"]["worker"]["spec"]["containers"][0]["image"] == image


def test_kubernetes_dask_config_uses_known_keys_and_names_the_manifest():
    import dask_kubernetes

    defaults = yaml.safe_load((Path(dask_kubernetes.__file__).parent / "kubernetes.yaml").read_text())["kubernetes"]
    ours = _load_yaml("kubernetes/dask-config.yaml")["kubernetes"]
    assert set(ours) <= set(defaults)
    assert (REPO_ROOT / ours["custom-cluster-spec"]).is_file()


# --------------------------------------------------------------------------- docs


def test_deploy_readme_describes_every_file():
    readme = (DEPLOY / "README.md").read_text()
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.name != "README.md" and "__pycache__" not in path.parts:
            assert path.relative_to(DEPLOY).as_posix() in readme, path
