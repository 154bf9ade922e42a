"""Sets TF_CONFIG for one process of a cluster job from the scheduler's environment, then runs
the training command (the multi-worker strategies read TF_CONFIG).

    # Slurm, in an sbatch script (one task per node; see launch/slurm.sbatch):
    srun python launch/tf_config.py slurm -- python -m mtss_train --strategy multi_worker ...
    # Kubernetes Indexed Job (see launch/k8s/job.yaml):
    python launch/tf_config.py k8s --workers 4 --service mtss -- python -m mtss_train ...
    # Parameter servers: host 0 is the chief (the coordinator), the next 2 the ps, the rest workers:
    srun python launch/tf_config.py slurm --ps 2 -- python -m mtss_train --strategy parameter_server ...
    # Just print it:
    python launch/tf_config.py slurm --print

Everything after `--` is the command. Slurm: the hosts are the job's nodes (SLURM_JOB_NODELIST,
compressed as `node[01-03,7]`), this one is SLURM_PROCID. Kubernetes: host k is the pod
`<job>-<k>.<service>` of an Indexed Job with a headless Service, this one is
JOB_COMPLETION_INDEX. Without --ps every host is a worker and worker 0 is the chief.
"""

import argparse
import json
import os
import re
import sys
from typing import Mapping

DEFAULT_PORT = 12345


class LaunchError(Exception):
    """The environment does not describe a cluster job this helper understands."""


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list -> host names: 'a[01-03,7],b' -> a01 a02 a03 a7 b."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", hostlist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            width = len(low)  # Slurm keeps the zero padding of the range's first bound.
            for number in range(int(low), int(high or low) + 1):
                hosts.append(f"{prefix}{number:0{width}d}")
    return hosts


def _need(env: Mapping[str, str], name: str) -> str:
    if name not in env:
        raise LaunchError(f"{name} is not set: run this inside the job (srun / the pod)")
    return env[name]


def cluster_config(hosts: list[str], index: int, port: int, parameter_servers: int = 0) -> dict:
    """TF_CONFIG of host `index`: every host a worker; or, with parameter servers, host 0
    the chief (the coordinator), the next `parameter_servers` hosts the ps, the rest workers."""
    if parameter_servers and len(hosts) < parameter_servers + 2:
        raise LaunchError(f"{len(hosts)} hosts cannot hold a chief, {parameter_servers} parameter server(s) "
                          "and at least one worker")
    if not 0 <= index < len(hosts):
        raise LaunchError(f"index {index} is outside the {len(hosts)} hosts {hosts}")
    addresses = [f"{host}:{port}" for host in hosts]
    if not parameter_servers:
        return {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}}
    cluster = {"chief": addresses[:1], "ps": addresses[1:parameter_servers + 1],
               "worker": addresses[parameter_servers + 1:]}
    job, first = ("chief", 0) if index == 0 else ("ps", 1) if index <= parameter_servers else (
        "worker", parameter_servers + 1)
    return {"cluster": cluster, "task": {"type": job, "index": index - first}}


def from_slurm(env: Mapping[str, str], port: int, parameter_servers: int = 0) -> dict:
    """TF_CONFIG of this Slurm task: one process per node, ordered as Slurm lists them."""
    hosts = expand_hostlist(env.get("SLURM_JOB_NODELIST") or _need(env, "SLURM_NODELIST"))
    tasks = int(env.get("SLURM_NTASKS", len(hosts)))
    if tasks != len(hosts):
        raise LaunchError(f"{tasks} Slurm tasks on {len(hosts)} nodes: use one task per node "
                          "(--ntasks-per-node=1); each worker uses all GPUs of its node")
    return cluster_config(hosts, int(_need(env, "SLURM_PROCID")), port, parameter_servers)


def from_indexed_job(env: Mapping[str, str], workers: int, service: str, port: int,
                     parameter_servers: int = 0) -> dict:
    """TF_CONFIG of pod JOB_COMPLETION_INDEX of an Indexed Job whose pods resolve as
    <hostname prefix>-<k>.<service> (the pod's HOSTNAME is <job>-<k>)."""
    index = int(_need(env, "JOB_COMPLETION_INDEX"))
    job = _need(env, "HOSTNAME").rsplit("-", 1)[0]
    return cluster_config([f"{job}-{k}.{service}" for k in range(workers)], index, port, parameter_servers)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scheduler", choices=["slurm", "k8s"])
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--workers", type=int, help="k8s: the Job's parallelism (every pod, whatever its role)")
    parser.add_argument("--ps", type=int, default=0, help="parameter servers (--strategy parameter_server)")
    parser.add_argument("--service", default="mtss", help="k8s: the headless Service's name")
    parser.add_argument("--print", action="store_true", help="print TF_CONFIG instead of running")
    split = argv.index("--") if "--" in argv else len(argv)
    args, command = parser.parse_args(argv[:split]), argv[split + 1:]
    try:
        if args.scheduler == "slurm":
            config = from_slurm(os.environ, args.port, args.ps)
        else:
            if not args.workers:
                raise LaunchError("k8s needs --workers (the Job's parallelism)")
            config = from_indexed_job(os.environ, args.workers, args.service, args.port, args.ps)
    except (LaunchError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print or not command:
        print(json.dumps(config))
        return 0
    os.environ["TF_CONFIG"] = json.dumps(config)
    os.execvp(command[0], command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
