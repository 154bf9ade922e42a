"""Cluster launchers: TF_CONFIG from Slurm's and Kubernetes' environments, the shipped job files."""

import json
import os
import subprocess
import sys

import pytest
import yaml

LAUNCH = os.path.join(os.path.dirname(__file__), "..", "launch")
sys.path.insert(0, LAUNCH)
import tf_config  # noqa: E402  From launch/, which is scripts, not a package.


@pytest.mark.parametrize("hostlist, hosts", [
    ("node07", ["node07"]),
    ("gpu[01-03,7],cpu5", ["gpu01", "gpu02", "gpu03", "gpu7", "cpu5"]),
    ("a[8-11]", ["a8", "a9", "a10", "a11"]),
    ("rack1-n[098-100]", ["rack1-n098", "rack1-n099", "rack1-n100"]),
])
def test_slurm_host_lists_expand(hostlist, hosts):
    assert tf_config.expand_hostlist(hostlist) == hosts


def run_helper(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(LAUNCH, "tf_config.py"), *args], capture_output=True,
                          text=True, env={"PATH": os.environ["PATH"], **env}, timeout=60)


def test_slurm_environment_gives_one_worker_per_node_and_this_tasks_index():
    env = {"SLURM_JOB_NODELIST": "gpu[01-02],gpu10", "SLURM_NTASKS": "3", "SLURM_PROCID": "2"}
    run = run_helper("slurm", "--port", "2222", "--print", env=env)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"cluster": {"worker": ["gpu01:2222", "gpu02:2222", "gpu10:2222"]},
                                      "task": {"type": "worker", "index": 2}}


@pytest.mark.parametrize("procid, task", [("0", {"type": "chief", "index": 0}), ("2", {"type": "ps", "index": 1}),
                                         ("4", {"type": "worker", "index": 1})])
def test_with_parameter_servers_the_first_host_coordinates_then_the_servers_then_the_workers(procid, task):
    env = {"SLURM_JOB_NODELIST": "n[1-5]", "SLURM_NTASKS": "5", "SLURM_PROCID": procid}
    run = run_helper("slurm", "--ps", "2", "--port", "2222", "--print", env=env)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {"cluster": {"chief": ["n1:2222"], "ps": ["n2:2222", "n3:2222"],
                                                  "worker": ["n4:2222", "n5:2222"]}, "task": task}
    three_nodes = {**env, "SLURM_JOB_NODELIST": "n[1-3]", "SLURM_NTASKS": "3"}
    too_few = run_helper("slurm", "--ps", "2", "--print", env=three_nodes)
    assert too_few.returncode == 2 and "3 hosts cannot hold a chief, 2 parameter server(s)" in too_few.stderr


def test_the_command_runs_with_tf_config_set():
    env = {"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}
    run = run_helper("slurm", "--", sys.executable, "-c", "import os; print(os.environ['TF_CONFIG'])", env=env)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["task"] == {"type": "worker", "index": 1}


@pytest.mark.parametrize("env, fragment", [
    ({}, "SLURM_NODELIST is not set"),
    ({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}, "use one task per node"),
])
def test_a_bad_slurm_environment_is_one_error_line(env, fragment):
    run = run_helper("slurm", "--print", env=env)
    assert run.returncode == 2 and run.stderr.startswith("error:") and fragment in run.stderr


def test_indexed_job_pods_find_each_other_through_the_headless_service():
    run = run_helper("k8s", "--workers", "3", "--service", "mtss", "--print",
                     env={"JOB_COMPLETION_INDEX": "1", "HOSTNAME": "mtss-train-1"})
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == {
        "cluster": {"worker": [f"mtss-train-{k}.mtss:12345" for k in range(3)]}, "task": {"type": "worker", "index": 1}}


def test_the_kubernetes_manifest_is_an_indexed_job_behind_a_headless_service():
    with open(os.path.join(LAUNCH, "k8s", "job.yaml")) as f:
        service, job = list(yaml.safe_load_all(f))
    assert (service["kind"], service["spec"]["clusterIP"]) == ("Service", "None")
    spec = job["spec"]
    assert (job["kind"], spec["completionMode"]) == ("Job", "Indexed")
    assert spec["completions"] == spec["parallelism"]
    assert spec["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    command = spec["template"]["spec"]["containers"][0]["command"]
    assert command[:3] == ["python", "launch/tf_config.py", "k8s"]
    assert f"--workers={spec['parallelism']}" in command and f"--service={service['metadata']['name']}" in command
    trainer = command[command.index("--") + 1:]
    assert trainer[:3] == ["python", "-m", "mtss_train"] and "--strategy=multi_worker" in trainer


def test_the_sbatch_template_runs_one_task_per_node_through_the_helper():
    script = open(os.path.join(LAUNCH, "slurm.sbatch")).read()
    assert "#SBATCH --ntasks-per-node=1" in script
    assert "srun python launch/tf_config.py slurm" in script and "--strategy multi_worker" in script
