"""A real single-node SLURM cluster for the tests, started and stopped by them.

Debian's slurm-wlm and munge (``make test`` installs them where apt exists). Everything the
cluster uses is private to one scratch folder: its own munge socket and key copy, its own
slurm.conf (clients find it through $SLURM_CONF), ports chosen free, state and logs, so it
neither needs nor touches a system SLURM. Needs root (slurmd starts jobs as their owner).

    with SlurmCluster() as cluster:      # or cluster.start() / cluster.stop()
        env = cluster.env()              # SLURM_CONF for clients (sbatch, squeue, submitit)

`SlurmCluster.unavailable()` says why a cluster cannot start here (None when it can), so
tests skip with the reason instead of failing.
"""
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

MUNGE_KEY = Path("/etc/munge/munge.key")  # written by the munge package on install
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "scontrol")


def _which(name):
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    def __init__(self, cpus: int | None = None):
        self.cpus = cpus or os.cpu_count() or 1
        self.host = socket.gethostname().split(".")[0]
        self.root: Path | None = None
        self.procs: list[subprocess.Popen] = []

    @staticmethod
    def unavailable() -> str | None:
        if os.geteuid() != 0:
            return "a private SLURM cluster needs root (slurmd starts jobs as their owner)"
        missing = [d for d in DAEMONS if not _which(d)]
        if missing:
            return (f"SLURM is not installed ({', '.join(missing)} missing): apt-get install "
                    "slurm-wlm munge (make test does where apt exists)")
        if not MUNGE_KEY.is_file():
            return f"{MUNGE_KEY} is missing (the munge package writes it)"
        return None

    # ------------------------------------------------------------------ set-up
    def env(self) -> dict:
        return {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}

    def _write_conf(self) -> None:
        r = self.root
        mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.9)
        lines = [
            "ClusterName=mocobench-test",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={r / 'munge/munge.socket'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "MpiDefault=none", "MailProg=/bin/true", "ReturnToService=2",
            # a cancelled job's processes get SIGKILL 2 s after SIGTERM; finished jobs stay
            # visible to squeue for an hour (the bench reads job states from squeue)
            "KillWait=2", "MinJobAge=3600", "SchedulerParameters=batch_sched_delay=0",
            "SlurmctldTimeout=30", "SlurmdTimeout=30", "InactiveLimit=0", "Waittime=0",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}", f"SlurmdLogFile={r / 'slurmd.log'}",
            "SlurmctldDebug=info", "SlurmdDebug=info",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={mem_mb} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        (r / "slurm.conf").write_text("\n".join(lines) + "\n")

    def _start_munge(self) -> None:
        d = self.root / "munge"
        d.mkdir()
        d.chmod(0o755)  # munged: every user must reach the socket
        key = d / "munge.key"
        shutil.copyfile(MUNGE_KEY, key)
        key.chmod(0o600)
        shutil.chown(d, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        # munged refuses to run as root; as our own child (not runuser's) it is reaped on stop
        cmd = [_which("munged"), "--foreground",
               f"--socket={d / 'munge.socket'}", f"--key-file={key}", f"--pid-file={d / 'munged.pid'}",
               f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"]
        self.procs.append(subprocess.Popen(cmd, user="munge", group="munge", extra_groups=[],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        self._poll(lambda: (d / "munge.socket").exists(), 10, "munged did not start", d / "munged.log")

    def start(self) -> "SlurmCluster":
        # /tmp, not pytest's 0700 tmp_path: the munge user must reach its socket
        self.root = Path(tempfile.mkdtemp(prefix="mocobench-slurm-"))
        self.root.chmod(0o755)
        for sub in ("state", "spool"):
            (self.root / sub).mkdir()
        self._write_conf()
        try:
            self._start_munge()
            env = self.env()
            for daemon, args in (("slurmctld", ["-D", "-i"]), ("slurmd", ["-D", "-N", self.host])):
                log = open(self.root / f"{daemon}.out", "w")
                self.procs.append(subprocess.Popen([_which(daemon), *args], env=env, stdout=log,
                                                   stderr=subprocess.STDOUT))
            self._poll(self._idle, 30, "the node did not become idle", self.root / "slurmctld.log")
        except BaseException:
            self.stop()
            raise
        return self

    def _idle(self) -> bool:
        out = subprocess.run([_which("sinfo"), "-h", "-o", "%T"], env=self.env(), capture_output=True,
                             text=True)
        return out.returncode == 0 and out.stdout.strip().startswith("idle")

    def _poll(self, ok, seconds, what, log) -> None:
        deadline = time.time() + seconds
        while time.time() < deadline:
            if ok():
                return
            dead = [p for p in self.procs if p.poll() is not None]
            if dead:
                break
            time.sleep(0.2)
        tail = Path(log).read_text(errors="replace")[-1500:] if Path(log).exists() else ""
        raise RuntimeError(f"{what}; log {log}:\n{tail}")

    # ------------------------------------------------------------------ use
    def run(self, *cmd, check=True) -> str:
        out = subprocess.run([_which(cmd[0]), *cmd[1:]], env=self.env(), capture_output=True,
                             text=True, timeout=60)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
        return out.stdout

    def jobs(self) -> dict[str, str]:
        """Every job the controller knows: id -> state (finished ones for MinJobAge)."""
        lines = self.run("squeue", "-h", "-t", "all", "-o", "%i|%T").split()
        return dict(line.split("|", 1) for line in lines)

    def wait_idle(self, seconds: float = 120) -> None:
        """Until no job is pending or running."""
        live = ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED")
        deadline = time.time() + seconds
        while time.time() < deadline:
            if not any(s in live for s in self.jobs().values()):
                return
            time.sleep(0.5)
        raise TimeoutError(f"jobs still live after {seconds} s: {self.jobs()}")

    @staticmethod
    def _processes(matches) -> list[int]:
        """Pids of the processes (other than this one) for which matches(cmdline, environ
        entries) holds."""
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit() and int(entry) != os.getpid():
                proc = Path(f"/proc/{entry}")
                try:
                    if matches((proc / "cmdline").read_bytes(), (proc / "environ").read_bytes().split(b"\0")):
                        found.append(int(entry))
                except OSError:
                    continue
        return found

    def job_processes(self, job: str) -> list[int]:
        """Processes of one job still on the node: its slurmstepd ("slurmstepd: [ID.batch]")
        and everything started inside it (SLURM_JOB_ID=ID)."""
        mark, title = f"SLURM_JOB_ID={job}".encode(), f"slurmstepd: [{job}.".encode()
        return self._processes(lambda cmdline, environ: cmdline.startswith(title) or mark in environ)

    def describe_job(self, job: str) -> str:
        """What the controller and the node say of a job: for a test's failure message."""
        said = [self.run("scontrol", "show", "job", job, check=False), self.run("sinfo", "-N", "-l", check=False),
                self.run("squeue", "-t", "all", "-o", "%i %j %T %r %S", check=False)]
        about = re.compile(rf"(JobId=|job |StepId=|JobID=){job}\b", re.I)
        for name in ("slurmctld.log", "slurmd.log"):
            lines = (self.root / name).read_text(errors="replace").splitlines()
            said.append(f"{name}:\n" + "\n".join(x for x in lines if about.search(x))[-4000:] + "\n")
        return "".join(said)

    def _leftovers(self) -> list[int]:
        """Processes started under this cluster (job steps and their children carry its
        SLURM_CONF)."""
        mark = f"SLURM_CONF={self.root / 'slurm.conf'}".encode()
        return self._processes(lambda cmdline, environ: mark in environ)

    def stop(self) -> None:
        if self.root and (self.root / "slurm.conf").exists() and self.procs:
            subprocess.run([_which("scancel"), "--full", "-u", "root"], env=self.env(),
                           capture_output=True, timeout=30)
            try:  # let slurmd end its job steps before it goes
                self.wait_idle(30)
            except (TimeoutError, RuntimeError, subprocess.TimeoutExpired):
                pass
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        if self.root:
            for pid in self._leftovers():
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
