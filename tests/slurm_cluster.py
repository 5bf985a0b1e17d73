"""A one-node SLURM cluster on this machine, for the profile test: munged, slurmctld and slurmd
started in the foreground from a private folder, and stopped by their process ids.

Needs root and Debian's ``slurm-wlm`` and ``munge`` packages (``.ci/run`` installs them).
Everything (key, socket, state, spool, logs, ports) lives in the folder; the one thing outside
it is a link from SLURM's default configuration path to the folder's slurm.conf, made only
where no SLURM is configured and removed on stop: the executor plugin's job steps call
``srun`` with SLURM_CONF removed from their environment, as on a real cluster.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
DEFAULT_CONF = Path("/etc/slurm/slurm.conf")


def unavailable_reason() -> str | None:
    """Why a cluster cannot be started here, or None when it can be tried."""
    missing = [name for name in (*DAEMONS, "sbatch", "squeue") if shutil.which(name) is None
               and not Path("/usr/sbin", name).exists()]
    if missing:
        return f"not installed: {', '.join(missing)} (Debian packages slurm-wlm and munge)"
    if os.geteuid() != 0:
        return "SLURM daemons must be started as root"
    if DEFAULT_CONF.exists() or DEFAULT_CONF.is_symlink():
        return f"a SLURM is already configured here ({DEFAULT_CONF}); the test does not replace it"
    return None


def _executable(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_config() -> tuple[str, int, int]:
    """(hostname, CPUs, RealMemory MB) as slurmd itself measures them (``slurmd -C``)."""
    text = subprocess.run([_executable("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split("=", 1) for item in text.split() if "=" in item)
    return fields["NodeName"], int(fields["CPUs"]), int(fields["RealMemory"])


def slurm_conf(folder: Path, host: str, cpus: int, memory_mb: int, extra_partitions: tuple[str, ...] = ()) -> str:
    """A minimal slurm.conf: one node with one (device-less) GPU gres, a default partition plus
    ``extra_partitions`` on the same node, no accounting database, no cgroups."""
    partitions = "".join(f"PartitionName={name} Nodes=ALL MaxTime=INFINITE State=UP\n"
                         for name in extra_partitions if name != "debug")
    return f"""\
ClusterName=pipelinetest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge.socket
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
MinJobAge=3600
GresTypes=gpu
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName={host} CPUs={cpus} RealMemory={memory_mb} Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
{partitions}"""


@dataclass
class Cluster:
    """A running one-node cluster: its folder, the environment its clients need, its daemons."""

    folder: Path
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)

    def logs(self) -> str:
        """The daemons' logs, for a failure message."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.folder.glob("*.log")))

    def stop(self) -> None:
        """Stop the daemons this cluster started, by their process ids, newest first, and
        remove the default-path link to this cluster's slurm.conf."""
        if DEFAULT_CONF.is_symlink() and DEFAULT_CONF.resolve() == (self.folder / "slurm.conf").resolve():
            DEFAULT_CONF.unlink()
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=15)


def start_cluster(folder: Path, extra_partitions: tuple[str, ...] = (), wait_s: float = 60) -> Cluster:
    """Start munged, slurmctld and slurmd in ``folder``; return when the node accepts jobs.

    Raises RuntimeError (with the daemons' logs) when the cluster does not come up.
    """
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool"):
        (folder / sub).mkdir(exist_ok=True)
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    host, cpus, memory_mb = node_config()
    conf = folder / "slurm.conf"
    conf.write_text(slurm_conf(folder, host, cpus, memory_mb, extra_partitions))
    # One GPU gres backed by /dev/null: jobs may request and get a GPU; the node has none.
    (folder / "gres.conf").write_text(f"AutoDetect=off\nNodeName={host} Name=gpu Count=1 File=/dev/null\n")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = Cluster(folder, env)
    commands = {
        "munged": [_executable("munged"), "--foreground", "--force", f"--key-file={key}",
                   f"--socket={folder}/munge.socket", f"--pid-file={folder}/munged.pid",
                   f"--log-file={folder}/munged.log", f"--seed-file={folder}/munged.seed"],
        "slurmctld": [_executable("slurmctld"), "-D", "-i", "-f", str(conf)],
        "slurmd": [_executable("slurmd"), "-D", "-f", str(conf), "-N", host],
    }
    try:
        DEFAULT_CONF.parent.mkdir(parents=True, exist_ok=True)
        DEFAULT_CONF.symlink_to(conf)
        for name, command in commands.items():
            with open(folder / f"{name}.out", "w") as out:
                cluster.processes[name] = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
            if name == "munged":
                _wait_for(lambda: (folder / "munge.socket").exists(), wait_s, "munged socket", cluster)
        _wait_for(lambda: "idle" in cluster.run("sinfo", "-h", "-o", "%T").stdout, wait_s, "an idle node", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for(ready, wait_s: float, what: str, cluster: Cluster) -> None:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        dead = [n for n, p in cluster.processes.items() if p.poll() is not None]
        if dead:
            raise RuntimeError(f"{', '.join(dead)} exited while waiting for {what}:\n{cluster.logs()}"
                               + "".join((cluster.folder / f"{n}.out").read_text() for n in dead))
        if ready():
            return
        time.sleep(0.5)
    raise RuntimeError(f"no {what} after {wait_s:.0f} s:\n{cluster.logs()}")
