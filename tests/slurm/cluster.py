"""A single-node SLURM cluster on 127.0.0.1 for tests (Debian's slurm packages, run as root).

Recipe checked on Debian 12 / slurm 22.05: munged as the munge user, slurmctld and slurmd
with their state, logs and PID files under a temporary folder; stopped by those PIDs.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ["munge", "slurmctld", "slurmd", "slurm-client"]
CONF = """ClusterName=ci
SlurmctldHost={node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation={state}/state
SlurmdSpoolDir={state}/spool
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MailProg=/bin/true
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def why_not_available() -> str | None:
    """None if a cluster can be started here, else why not."""
    if os.geteuid() != 0:
        return "needs root (it starts munged, slurmctld and slurmd)"
    conf = Path("/etc/slurm/slurm.conf")
    if conf.exists() and "ClusterName=ci\n" not in conf.read_text():
        return f"{conf} exists and is not this test's: a real SLURM node is left alone"
    if shutil.which("slurmctld") is None:
        if shutil.which("apt-get") is None:
            return "slurm is not installed and there is no apt-get"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        proc = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], env=env,
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            return f"apt-get install {' '.join(PACKAGES)} failed: {proc.stderr.strip().splitlines()[-1:]}"
    return None


class Cluster:
    def __init__(self, state: Path):
        self.state = state
        self.pids: list[int] = []

    def start(self) -> "Cluster":
        node = socket.gethostname().split(".")[0]
        for sub in ("state", "spool"):
            (self.state / sub).mkdir(parents=True, exist_ok=True)
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run(["mungekey", "--create"], check=True)
            shutil.chown(key, "munge", "munge")
            key.chmod(0o400)
        subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "/run/munge"], check=True)
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode != 0:
            Path("/run/munge/munged.pid").unlink(missing_ok=True)
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
            self.pids.append(int(self._wait_for_file(Path("/run/munge/munged.pid")).read_text()))
        Path("/etc/slurm").mkdir(exist_ok=True)
        Path("/etc/slurm/slurm.conf").write_text(CONF.format(node=node, state=self.state, cpus=os.cpu_count()))
        subprocess.run(["slurmctld"], check=True)
        subprocess.run(["slurmd"], check=True)
        for name in ("slurmctld", "slurmd"):
            self.pids.append(int(self._wait_for_file(self.state / f"{name}.pid").read_text()))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.strip()
            if out == "idle":
                return self
            time.sleep(0.2)
        raise RuntimeError(f"the SLURM node did not come up (sinfo: {out!r}); see {self.state}/*.log")

    @staticmethod
    def _wait_for_file(path: Path, timeout: float = 20) -> Path:
        deadline = time.monotonic() + timeout
        while not path.exists() or not path.read_text().strip():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{path} did not appear")
            time.sleep(0.1)
        return path

    def stop(self) -> None:
        """Cancel every job, then SIGTERM to the daemons this cluster started, SIGKILL to any
        left after 10 s, and to job step daemons left behind."""
        subprocess.run(["scancel", "--full", "--signal=KILL", "--user=root"], capture_output=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and subprocess.run(["squeue", "-h"], capture_output=True,
                                                             text=True).stdout.strip():
            time.sleep(0.2)
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        for pid in self.pids:
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["pkill", "-KILL", "-x", "slurmstepd"], capture_output=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
