"""One bench stage, run the same way by both executors.

    python -m transfer.stage PLAN NAME       # what the local executor starts, one per stage
    python -m transfer.stage --finish PLAN   # the report stage's first command (settle the rest)

In a SLURM job, transfer.executors.StageJob calls `run` inside submitit's job process.

A stage is a list of commands (argv lists, never a shell string) run one after the
other with their output in FOLDER/stage.log, launched as their tool expects (`launch_argv`:
plain python, torchrun, or Detectron2's own launcher; several nodes under SLURM). The
runner writes FOLDER/stage.json: "running" when it starts (pid, host, SLURM job id), then
"done" or "failed" with the reason (the tool's last `error:` line). A task stage deletes
its previous results.json first, and writes a "failed" results.json when it fails, so
`report` never reads an earlier run's numbers as this run's.

Process trees: the local runner takes SIGTERM when the bench dies (PR_SET_PDEATHSIG,
even for SIGKILL) or stops it, and then kills every process below it, including
torchrun's workers, which run in sessions of their own. Under SLURM the job's processes
are SLURM's to kill; SIGTERM there means preemption or cancellation: the tool is asked
to stop (SIGTERM: pretrain saves, torchrun passes it on) and no failure is recorded, so
a requeued job simply runs the stage again (pretraining resumes from its checkpoint).
"""
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mocobench.errors import UserError, one_line
from mocobench.fileio import atomic_json, ensure_room, sha256_file

RECORD = "stage.json"
PR_SET_PDEATHSIG = 1
PARENT_ENV = "MOCO_BENCH_STAGE_PARENT"  # the bench's pid, so a runner notices a parent already gone


# ----------------------------------------------------------------------------- records

def read_record(folder) -> dict:
    """FOLDER/stage.json, {} when absent; {"unreadable": why} when it cannot be read (a
    half-written or hand-edited file): the stage then runs again."""
    path = Path(folder) / RECORD
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return {"unreadable": f"{type(e).__name__}: {e}"}
    return record if isinstance(record, dict) else {"unreadable": f"holds a {type(record).__name__}"}


def write_record(folder, record: dict) -> None:
    with contextlib.suppress(OSError):  # an unwritable folder: the stage's reason says so
        atomic_json(record, Path(folder) / RECORD)


def write_failed_result(spec: dict, status: str, reason: str) -> None:
    """A "failed"/"missing" results.json for a task stage, over any earlier one."""
    result = spec.get("result")
    if not result:
        return
    from transfer.results import write_results

    weights = spec.get("weights")
    record = {"path": weights, "sha256": None, "label": result["label"]}
    with contextlib.suppress(OSError, UserError):  # the folder may be what failed
        write_results(spec["folder"], task=result["task"], dataset={"name": "", "splits": {}},
                      weights=record, engine="", protocol={}, config={"args": result["args"]},
                      seed=result.get("seed") or 0, wall_time_s=0.0, metrics={}, status=status,
                      reason=reason)


_digests: dict = {}


def digest(path) -> str | None:
    """sha256 of a file (None when absent), remembered by size and mtime for this process."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        _digests[key] = sha256_file(path)
    return _digests[key]


# ----------------------------------------------------------------------------- launching

def launch_argv(command: list[str], launch: dict, node: int = 0, hosts=(), job_id: str = "") -> list[str]:
    """The argv that starts `command` ([module, args...]) as its tool expects, with
    launch = {"style": "python" | "torchrun" | "detectron2", "nproc": per node, "nodes": N}.
    Several nodes (SLURM): one launcher per node, meeting at the first node's address."""
    module, *args = command
    style, nproc, nodes = launch.get("style", "python"), launch.get("nproc", 1), launch.get("nodes", 1)
    python = [sys.executable, "-m"]
    if style == "python" or (nproc <= 1 and nodes <= 1):
        return [*python, module, *args]
    port = 20000 + int(job_id or 0) % 20000 if nodes > 1 else 0
    master = hosts[0] if nodes > 1 else "127.0.0.1"
    if style == "detectron2":  # its launch spawns the processes; flags before the KEY VALUE pairs
        flags = ["--num-gpus", str(nproc)]
        if nodes > 1:
            flags += ["--num-machines", str(nodes), "--machine-rank", str(node),
                      "--dist-url", f"tcp://{master}:{port}"]
        return [*python, module, *args[:1], *flags, *args[1:]]
    rendezvous = [f"--nnodes={nodes}", f"--rdzv-id={job_id}"] if nodes > 1 else []
    return [*python, "torch.distributed.run", f"--nproc_per_node={nproc}", *rendezvous,
            "--rdzv-backend=c10d", f"--rdzv-endpoint={master}:{port}", "-m", module, *args]


def _prctl_pdeathsig():
    """prctl(PR_SET_PDEATHSIG, sig) bound before any fork (ctypes after fork is unsafe)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the bench's own clean-up still runs
        return None


class Child:
    """The tool process of the running command, and the processes below it."""

    current: "Child | None" = None

    def __init__(self, argv, log, env, slurm: bool):
        prctl, parent = _prctl_pdeathsig(), os.getpid()

        def prepare():  # in the child, before exec
            if prctl is not None:
                prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:
                os._exit(1)
            if slurm:  # submitit's timeout signal is for the job process, not the tool
                signal.signal(signal.SIGUSR2, signal.SIG_IGN)

        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     env=env, preexec_fn=prepare)
        Child.current = self

    def wait(self) -> int:
        """Poll (not a blocking wait) so that signal handlers may poll it too."""
        while self.proc.poll() is None:
            time.sleep(0.2)
        Child.current = None
        return self.proc.returncode

    def stop(self, seconds: float) -> None:
        """SIGTERM to the tool (pretrain saves, torchrun passes it to its workers), then
        SIGKILL to every process still below this one after `seconds`."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        deadline = time.time() + seconds
        while self.proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        kill_descendants(os.getpid())


def _children_of() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def kill_descendants(pid: int) -> None:
    """SIGKILL every process below `pid`, whatever session or group it moved to (torchrun
    starts its workers in sessions of their own). Stops each first, so none forks away."""
    if not os.path.isdir("/proc"):
        return
    for _ in range(5):  # a process may fork between listing and stopping
        children, stack, found = _children_of(), [pid], []
        while stack:
            for c in children.get(stack.pop(), []):
                found.append(c)
                stack.append(c)
        if not found:
            return
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for p in found:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p, sig)
        time.sleep(0.05)


# ----------------------------------------------------------------------------- one stage

def _reason(log_path: Path, code: int) -> str:
    lines = log_path.read_text(errors="replace").splitlines()
    errors = [x for x in lines if x.startswith("error: ")]
    reason = errors[-1][7:] if errors else (lines[-1] if lines else f"exit status {code}")
    if code < 0:
        reason = f"killed by {signal.Signals(-code).name}: {reason}"
    return f"{one_line(reason)} (log: {log_path})"


def _run_commands(spec, log_path: Path, node: int, hosts, job_id: str, slurm: bool) -> str:
    env = {**os.environ, **spec.get("env", {})}
    with open(log_path, "a") as log:
        for command in spec["commands"]:
            argv = launch_argv(command, spec.get("launch", {}), node, hosts, job_id)
            log.write("$ " + " ".join(map(repr, argv)) + "\n")
            log.flush()
            code = Child(argv, log, env, slurm).wait()
            if code != 0:
                log.flush()
                return _reason(log_path, code)
    return ""


_interrupted = False


def interrupt(grace_s: float) -> None:
    """SLURM is stopping this job (preemption, time limit, scancel): stop the tool, giving it
    `grace_s` to save (pretrain writes its checkpoint on SIGTERM), and record nothing."""
    global _interrupted
    _interrupted = True
    if Child.current is not None:
        Child.current.stop(grace_s)


def run(spec: dict, node: int = 0, hosts=(), job_id: str = "", slurm: bool = False) -> str | None:
    """Run the stage `spec` describes; returns "" when done, else the one-line reason (None:
    interrupted by SLURM, nothing recorded). Node 0 keeps the records; other nodes (SLURM,
    several nodes) only run the commands."""
    folder = Path(spec["folder"])
    if node > 0:
        reason = _run_commands(spec, folder / f"stage.node{node}.log", node, hosts, job_id, slurm)
        return None if _interrupted else reason
    tic, started = time.perf_counter(), time.time()
    record = {"name": spec["name"], "key": spec["key"], "status": "running", "pid": os.getpid(),
              "host": socket.gethostname(), "job_id": job_id or None, "started": round(started, 3),
              "parts": spec.get("parts", {})}
    try:
        ensure_room(folder, spec.get("need_bytes", 0), f"the {spec['name']} stage's outputs")
        if spec.get("result"):  # a crash below must not leave the previous numbers behind
            (folder / "results.json").unlink(missing_ok=True)
        record["inputs"] = {p: digest(p) for p in spec.get("inputs", [])}
        previous = read_record(folder)
        write_record(folder, record)
        log_path = folder / "stage.log"
        requeued = job_id and previous.get("job_id") == job_id and previous.get("status") == "running"
        if not requeued:  # a requeued job keeps the log of its first attempt
            log_path.write_text("")
        reason = _run_commands(spec, log_path, node, hosts, job_id, slurm)
    except UserError as e:
        reason = one_line(str(e))
    except Exception as e:  # submitit gave up requeueing (time-outs): say so, then let it fail the job
        _finish(spec, record, tic, f"the SLURM job stopped: {one_line(str(e))}; raise its time_min")
        raise
    if _interrupted:
        return None
    if not reason:
        missing = [p for p in spec.get("outputs", []) if not Path(p).exists()]
        if missing:
            reason = f"finished without writing {', '.join(missing)} (log: {folder / 'stage.log'})"
    _finish(spec, record, tic, reason)
    return reason


def _finish(spec: dict, record: dict, tic: float, reason: str) -> None:
    record.update(status="failed" if reason else "done", reason=reason,
                  seconds=round(time.perf_counter() - tic, 1))
    write_record(spec["folder"], record)
    if reason:
        write_failed_result(spec, "failed", reason)


# ----------------------------------------------------------------------------- after the jobs

def finish(plan: list[dict]) -> list[str]:
    """Settle every stage of `plan` that did not end (SLURM cancelled it because a stage it
    needs failed, or its job was killed): write its record and its "failed" row, so the
    report shows each row's fate. Runs before the report; returns the stages it settled."""
    by_name = {s["name"]: s for s in plan}
    settled = []
    for spec in plan:
        if spec["kind"] == "report":
            continue
        record = read_record(spec["folder"])
        if record.get("key") == spec["key"] and record.get("status") in ("done", "failed", "missing"):
            continue
        status, reason = "failed", (f"its SLURM job {record.get('job_id')} ended without finishing "
                                    f"(cancelled, killed or out of time; see {spec['folder']}/slurm/)")
        for dep in spec["deps"]:
            dep_record = read_record(by_name[dep]["folder"])
            if dep_record.get("status") in ("failed", "missing"):
                status = dep_record["status"]
                what = by_name[dep]["what"]
                reason = dep_record.get("reason", "")
                if status == "failed" and what and not reason.startswith(what):
                    reason = f"{what} failed: {reason}"
                break
        write_record(spec["folder"], {"name": spec["name"], "key": spec["key"], "status": status,
                                      "reason": reason, "job_id": record.get("job_id")})
        write_failed_result(spec, status, reason)
        settled.append(spec["name"])
        print(f"{spec['name']}: {status}: {reason}", flush=True)
    return settled


# ----------------------------------------------------------------------------- local runner

def _die_with_the_bench() -> None:
    """Take SIGTERM when the bench that started this runner dies, however it dies."""
    prctl = _prctl_pdeathsig()
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    parent = os.environ.get(PARENT_ENV)
    if parent and os.getppid() != int(parent):  # it died before the line above
        os._exit(143)


def _on_sigterm(signum, frame) -> None:
    kill_descendants(os.getpid())
    os._exit(143)


def main(argv=None) -> None:
    """python -m transfer.stage PLAN NAME   (run one stage; prints {"reason": ...})
    python -m transfer.stage --finish PLAN (settle what did not run, before the report)"""
    argv = sys.argv[1:] if argv is None else argv
    if argv[0] == "--finish":
        finish(json.loads(Path(argv[1]).read_text()))
        return
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGINT, _on_sigterm)
    _die_with_the_bench()
    spec = next(s for s in json.loads(Path(argv[0]).read_text()) if s["name"] == argv[1])
    reason = run(spec)
    print(json.dumps({"reason": reason}), flush=True)
    sys.exit(1 if reason else 0)


if __name__ == "__main__":
    main()
