"""How the bench's planned stages run: on this machine (``executor: local``) or as SLURM
jobs through submitit (``executor: slurm``). Both run each stage through transfer.stage,
skip what is cached, and turn a failed stage into "failed" rows for what depends on it.

local   a stage starts once the stages it needs are done, `jobs` at a time, each as its
        own runner process in a session of its own: a Ctrl-C, a kill or a crash of the bench
        takes every stage process down with it (transfer.stage).
slurm   every stage that is not cached is submitted at once, with ``afterok`` dependencies
        on the stages it needs (``--kill-on-invalid-dep=yes``: when a stage fails, SLURM
        cancels what depends on it instead of leaving it pending forever), and the report
        with ``afterany`` on every task. Job ids go into each stage.json: running the bench
        again submits nothing that is still queued or running, and collects what finished.
        Job states come from squeue, stage outcomes from stage.json (no accounting needed).
"""
import contextlib
import getpass
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from mocobench.errors import UserError, one_line
from mocobench.fileio import atomic_json, ensure_room
from transfer import stage as runner
from transfer.bench_plan import Stage

# A job pending on a dependency that failed: SLURM will never start it (it cancels it itself
# with --kill-on-invalid-dep=yes; some clusters turn that off, or have it broken)
NEVER = "DEPENDENCY_NEVER_SATISFIED"
LIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
        "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
PLAN_FILE = "bench_plan.json"


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


# ----------------------------------------------------------------------------- shared

class Progress:
    """One line per stage. The ETA prices each remaining stage at the mean time of the
    stages of its kind (pretrain, convert, a task) that ran to completion; kinds not yet
    timed are counted, not guessed (a pretraining is not what a kNN costs)."""

    def __init__(self, stages: list[Stage], parallel: int):
        self.total, self.parallel = len(stages), parallel
        self.remaining = [s.name for s in stages]
        self.done, self.start = 0, time.perf_counter()
        self.timed: dict[str, list[float]] = {}
        self.statuses: dict[str, str] = {}

    def __call__(self, name: str, status: str, seconds: float = 0.0, note: str = "") -> None:
        self.done += 1
        self.remaining.remove(name)
        self.statuses[name] = status
        if status == "done":
            self.timed.setdefault(name.split("/")[0], []).append(seconds)
        eta, untimed = 0.0, 0
        for stage in self.remaining:
            times = self.timed.get(stage.split("/")[0])
            if times:
                eta += sum(times) / len(times) / self.parallel
            else:
                untimed += 1
        eta_text = f"ETA ~{_fmt(eta)}" + (f" + {untimed} stage(s) not yet timed" if untimed else "")
        elapsed = time.perf_counter() - self.start
        print(f"[{self.done:2d}/{self.total}] {name:40s} {status:8s} {_fmt(seconds):>6s}"
              f"   elapsed {_fmt(elapsed)}, {eta_text}{note}", flush=True)


@dataclass
class Outcome:
    """What a bench invocation ended with; `exit()` turns it into the exit status."""
    statuses: dict[str, str]
    report: str = ""
    pending: list[str] = field(default_factory=list)

    def exit(self) -> None:
        tasks = {n: s for n, s in self.statuses.items()
                 if not n.startswith(("pretrain/", "convert/")) and n != "report"}
        if not self.pending and tasks and not any(s in ("done", "cached") for s in tasks.values()):
            raise UserError("no stage produced a result: every task stage failed or is missing "
                            "(the reasons are above and in each stage's results.json)")
        failed = [n for n, s in self.statuses.items() if s == "FAILED"]
        if failed:
            print(f"bench: {len(failed)} stage(s) failed: {', '.join(failed)}", file=sys.stderr)
            sys.exit(1)


def cache_check(stage: Stage, record: dict, deps_cached: bool) -> str | None:
    """None when `stage` is cached (its record has its key and says done, what it
    read is unchanged and what it wrote is still there), else why it must run."""
    if "unreadable" in record:
        return f"its stage.json is unreadable ({record['unreadable']}): running it again"
    if record.get("key") != stage.key or record.get("status") != "done" or not deps_cached:
        return "not done"
    gone = [p for p in stage.outputs if not Path(p).exists()]
    if gone:
        return f"{', '.join(gone)} is gone: running it again"
    changed = [p for p, d in (record.get("inputs") or {}).items() if runner.digest(p) != d]
    if changed:
        return f"{', '.join(changed)} changed since it ran: running it again"
    return None


def blocked(stage: Stage, state: dict) -> tuple[str, str] | None:
    """(status, reason) when a stage `stage` needs did not succeed."""
    for dep in stage.deps:
        status, reason = state[dep.name]
        if status in ("failed", "missing"):
            if status == "missing" or not dep.what:
                return status, reason
            return "failed", reason if reason.startswith(dep.what) else f"{dep.what} failed: {reason}"
    return None


def mark_not_run(stage_spec: dict, status: str, reason: str) -> None:
    """A stage that could not run: its record, and (task stages) its results.json row."""
    runner.write_record(stage_spec["folder"], {"name": stage_spec["name"], "key": stage_spec["key"],
                                               "status": status, "reason": reason})
    runner.write_failed_result(stage_spec, status, reason)


def resolve_source(stage: Stage) -> str:
    """Run a source stage in the bench's own process; returns "" or the reason."""
    from transfer import bench_sources

    src = stage.source
    try:
        ensure_room(stage.folder, 0, f"the {stage.name} stage's outputs")
        if src["kind"] == "random":
            bench_sources.random_init(src["arch"], src["seed"], stage.weights)
        elif src["kind"] == "checkpoint":
            bench_sources.checkpoint_file(src["path"], src["label"])
        else:
            bench_sources.imagenet_weights(src["arch"], src["path"], src["url"])
    except UserError as e:
        return one_line(str(e))
    return ""


def _source(stage: Stage, progress, state: dict) -> None:
    """Baseline weights the bench finds or draws itself; "cached" when they are the ones
    the previous run used (same key: file contents, or the checksummed hub file name)."""
    cached = cache_check(stage, runner.read_record(stage.folder), True) is None
    tic = time.perf_counter()
    reason = "" if cached and stage.source["kind"] == "random" else resolve_source(stage)
    state[stage.name] = ("missing", reason) if reason else ("ok", "")
    if not cached or reason:
        runner.write_record(stage.folder, {"name": stage.name, "key": stage.key,
                                           "status": "missing" if reason else "done", "reason": reason})
    progress(stage.name, "missing" if reason else "cached" if cached else "done",
             time.perf_counter() - tic)
    if reason:
        print(f"      {stage.name}: {reason}", flush=True)


def write_plan(out: Path, stages: list[Stage]) -> Path:
    path = out / PLAN_FILE
    atomic_json([s.spec() for s in stages], path)
    return path


def _report_text(report: Stage) -> str:
    """The tables the report command printed (the last command's output in stage.log)."""
    with contextlib.suppress(OSError):
        text = (report.folder / "stage.log").read_text(errors="replace")
        last = text.rsplit("\n$ ", 1)[-1] if "\n$ " in text else text
        return "\n".join(line for line in last.splitlines()[1:] if not line.startswith("wrote "))
    return ""


def _finish_report(report: Stage, progress, tic, line: bool = True) -> Outcome:
    """Print the report's line (unless printed already) and its tables; the Outcome."""
    record = runner.read_record(report.folder)
    ok = record.get("key") == report.key and record.get("status") == "done"
    if line:
        progress(report.name, "done" if ok else "FAILED", time.perf_counter() - tic)
    else:
        progress.statuses[report.name] = "done" if ok else "FAILED"
    text = _report_text(report) if ok else f"no report: {record.get('reason') or 'see ' + str(report.folder)}"
    print(f"\nbench finished in {_fmt(time.perf_counter() - progress.start)}; "
          f"tables in {report.folder / 'report.md'}\n", flush=True)
    print(text, flush=True)
    return Outcome(dict(progress.statuses), text)


def _header(cfg, stages) -> None:
    print(f"bench {cfg.name}: {len(cfg.pretrainings)} pretrainings x {len(cfg.tasks)} tasks, "
          f"{len(stages)} stages -> {stages[-1].folder.parent} (executor {cfg.executor})", flush=True)
    if cfg.scale:
        print(f"scale: {cfg.scale}", flush=True)


def run(cfg, out: Path, stages: list[Stage], wait: bool = False) -> Outcome:
    _header(cfg, stages)
    plan_path = out / PLAN_FILE
    executor = Slurm(cfg, stages, plan_path) if cfg.executor == "slurm" else Local(cfg, stages, plan_path)
    write_plan(out, stages)  # after Local's check: a queued report job reads this file
    return executor.run(wait) if cfg.executor == "slurm" else executor.run()


# ----------------------------------------------------------------------------- local

class Local:
    def __init__(self, cfg, stages: list[Stage], plan_path: Path):
        self.cfg, self.stages, self.plan_path = cfg, stages, plan_path
        self._refuse_live_jobs()
        self.env = {**os.environ, runner.PARENT_ENV: str(os.getpid())}
        if cfg.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
            # concurrent stages share the cores instead of each taking all of them
            self.env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cfg.jobs))

    def _refuse_live_jobs(self) -> None:
        """A stage still queued or running under SLURM must not also run here."""
        ids = {runner.read_record(s.folder).get("job_id"): s.name for s in self.stages}
        ids.pop(None, None)
        if not ids or not shutil.which("squeue"):
            return
        live = {j: s for j, s in job_states().items() if j in ids and s in LIVE}
        if live:
            job, state = next(iter(live.items()))
            raise UserError(f"stage {ids[job]} is SLURM job {job} ({state}): wait for it or scancel "
                            f"{' '.join(live)}, before running this bench with executor local")

    def start(self, stage: Stage) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "transfer.stage", str(self.plan_path), stage.name]
        # a session of its own: the terminal's Ctrl-C reaches the bench, which stops the stage
        return subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                text=True, start_new_session=True)

    def finished(self, stage: Stage, proc: subprocess.Popen, tic: float, progress, state) -> None:
        line = (proc.stdout.read() or "").strip().splitlines()
        result = json.loads(line[-1]) if line else {"reason": f"runner exit status {proc.returncode}"}
        reason = result.get("reason") or ("" if proc.returncode == 0 else f"exit status {proc.returncode}")
        state[stage.name] = ("failed", reason) if reason else ("ok", "")
        if stage.kind == "report":
            return
        progress(stage.name, "FAILED" if reason else "done", time.perf_counter() - tic)
        if reason:
            print(f"      {stage.name}: {reason}", flush=True)

    def _next(self, pending: list[Stage], state: dict, progress) -> Stage | None:
        """The first pending stage whose needs are met; stages that cannot run are settled."""
        for stage in list(pending):
            if any(d.name not in state for d in stage.deps):
                continue
            pending.remove(stage)
            why = blocked(stage, state) if stage.kind != "report" else None
            if why:
                mark_not_run(stage.spec(), *why)
                state[stage.name] = why
                progress(stage.name, why[0])
            elif stage.source:
                _source(stage, progress, state)
            elif stage.kind != "report" and cache_check(
                    stage, runner.read_record(stage.folder),
                    all(progress.statuses.get(d.name) == "cached" for d in stage.deps)) is None:
                state[stage.name] = ("ok", "")
                progress(stage.name, "cached")
            else:
                return stage
        return None

    def run(self) -> Outcome:
        if self.cfg.jobs > 1:
            print(f"jobs: {self.cfg.jobs} stages at once, "
                  f"OMP_NUM_THREADS={self.env.get('OMP_NUM_THREADS', 'unset')}", flush=True)
        progress, state = Progress(self.stages, self.cfg.jobs), {}
        pending, running = list(self.stages), {}
        report_tic = None
        try:
            while pending or running:
                while len(running) < self.cfg.jobs:
                    stage = self._next(pending, state, progress)
                    if stage is None:
                        break
                    running[stage.name] = (stage, self.start(stage), time.perf_counter())
                    report_tic = running[stage.name][2] if stage.kind == "report" else report_tic
                for name, (stage, proc, tic) in list(running.items()):
                    if proc.poll() is not None:
                        del running[name]
                        self.finished(stage, proc, tic, progress, state)
                time.sleep(0.1)
        finally:
            for _, proc, _ in running.values():  # an error or Ctrl-C: no stage outlives the bench
                proc.terminate()
            for _, proc, _ in running.values():
                proc.wait()
        return _finish_report(self.stages[-1], progress, report_tic or time.perf_counter())


# ----------------------------------------------------------------------------- slurm

def slurm_unavailable() -> str | None:
    missing = [c for c in ("sbatch", "squeue", "scancel", "srun") if not shutil.which(c)]
    if missing:
        return f"SLURM's {', '.join(missing)} are not on PATH here (run the bench on a login node)"
    if importlib.util.find_spec("submitit") is None:
        return "submitit is not installed: pip install submitit"
    return None


def job_states() -> dict[str, str]:
    """State of each of this user's jobs the controller still knows (finished ones stay for
    MinJobAge): job id -> PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, ... or NEVER."""
    try:
        out = subprocess.run(["squeue", "-u", getpass.getuser(), "-h", "-t", "all", "-o", "%i|%T|%r"],
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"squeue did not answer ({e}); is the SLURM controller up?") from None
    if out.returncode != 0:
        raise UserError(f"squeue failed: {one_line(out.stderr or out.stdout)}")
    states = {}
    for line in out.stdout.splitlines():
        job, state, reason = (line.strip().split("|") + ["", ""])[:3]
        if job:
            states[job] = NEVER if state == "PENDING" and reason == "DependencyNeverSatisfied" else state
    return states


def cancel_never_satisfied(states: dict[str, str], ours) -> None:
    """Cancel our jobs SLURM will never start (a stage they need failed), so that what waits
    for them with afterany (the report) runs, and their rows say why."""
    doomed = [j for j in ours if states.get(j) == NEVER]
    if doomed:
        subprocess.run(["scancel", *doomed], capture_output=True, timeout=60)
        print(f"cancelled job(s) {' '.join(doomed)}: a stage they need failed", flush=True)


def sbatch_parameters(cfg, stage: Stage, after: list[str], kind: str = "afterok") -> dict:
    """submitit SlurmExecutor parameters of one stage: one task per node (the tool's own
    launcher starts its processes), its resources, dependencies, and requeue on USR2."""
    r = stage.resources
    params = {"job_name": f"moco-bench/{stage.name}", "nodes": r.nodes, "ntasks_per_node": 1,
              "cpus_per_task": r.cpus_per_task, "mem": f"{r.mem_gb:g}GB", "time": r.time_min,
              "signal_delay_s": cfg.slurm.signal_delay_s}
    if r.gpus_per_node:
        params["gpus_per_node"] = r.gpus_per_node
    for name in ("partition", "account", "qos", "constraint"):
        if getattr(r, name):
            params[name] = getattr(r, name)
    extra = {"kill-on-invalid-dep": "yes"}
    if after:
        extra["dependency"] = f"{kind}:" + ":".join(after)
    for flag in r.sbatch:
        key, eq, value = flag[2:].partition("=")
        extra[key] = value if eq else True
    params["additional_parameters"] = extra
    return params


def stage_env(stage: Stage) -> dict:
    """Threads per process: the job's CPUs shared by the processes of a node."""
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    return {"OMP_NUM_THREADS": str(max(1, stage.resources.cpus_per_task // stage.launch["nproc"]))}


class StageJob:
    """What a SLURM job runs: the stage, in submitit's job process. Requeue-safe: on
    SIGUSR2 before the time limit (or preemption) the tool is stopped with SIGTERM (pretrain
    writes its checkpoint), and submitit requeues this same stage, which runs its command
    again: pretraining resumes from its last checkpoint, other stages start over."""

    def __init__(self, spec: dict, grace_s: float):
        self.spec, self.grace_s = spec, grace_s

    def __call__(self) -> str:
        import signal

        import submitit

        env = submitit.JobEnvironment()
        signal.signal(signal.SIGTERM, self._terminated)  # over submitit's "bypass"
        reason = runner.run(self.spec, node=env.node, hosts=env.hostnames, job_id=env.job_id,
                            slurm=True)
        if reason is None:  # stopped by SLURM: it kills or requeues this job; claim nothing
            time.sleep(600)
            raise RuntimeError("stopped by SIGTERM but not killed within 10 minutes")
        if reason:
            raise RuntimeError(reason)  # the job fails: SLURM cancels what depends on it
        return "done"

    def _terminated(self, signum, frame) -> None:
        runner.interrupt(self.grace_s)

    def checkpoint(self):
        from submitit.helpers import DelayedSubmission

        runner.interrupt(self.grace_s)
        return DelayedSubmission(self)


class Slurm:
    def __init__(self, cfg, stages: list[Stage], plan_path: Path):
        self.cfg, self.stages, self.plan_path = cfg, stages, plan_path
        self.states = job_states()
        ours = [str(runner.read_record(s.folder).get("job_id")) for s in stages]
        cancel_never_satisfied(self.states, ours)
        self.jobs: dict[str, str] = {}  # stage name -> its live job id
        self.new: set[str] = set()  # stages submitted by this invocation

    def submit(self, stage: Stage, after: list[str], kind: str = "afterok") -> str:
        import submitit

        executor = submitit.SlurmExecutor(folder=stage.folder / "slurm",
                                          max_num_timeout=self.cfg.slurm.max_requeues)
        executor.update_parameters(**sbatch_parameters(self.cfg, stage, after, kind))
        spec = {**stage.spec(), "env": stage_env(stage)}
        try:
            job = executor.submit(StageJob(spec, max(5, self.cfg.slurm.signal_delay_s - 30)))
        except Exception as e:  # noqa: BLE001 - sbatch's own message: a partition, an account...
            raise UserError(f"sbatch refused stage {stage.name}: {one_line(str(e))}") from None
        runner.write_record(stage.folder, {"name": stage.name, "key": stage.key, "status": "submitted",
                                           "job_id": job.job_id, "submitted": round(time.time(), 3),
                                           "after": after})
        self.new.add(stage.name)
        return job.job_id

    def _live_job(self, stage: Stage, record: dict) -> str | None:
        job = record.get("job_id")
        return job if job and self.states.get(str(job)) in LIVE else None

    def _cancel(self, job: str) -> None:
        subprocess.run(["scancel", str(job)], capture_output=True, timeout=60)

    def _stage(self, stage: Stage, progress, state: dict) -> None:
        why = blocked(stage, state)
        if why:
            mark_not_run(stage.spec(), *why)
            state[stage.name] = why
            progress(stage.name, why[0])
            return
        if stage.source:
            return _source(stage, progress, state)
        record = runner.read_record(stage.folder)
        deps_cached = all(progress.statuses.get(d.name) == "cached" for d in stage.deps)
        if cache_check(stage, record, deps_cached) is None:
            state[stage.name] = ("ok", "")
            return progress(stage.name, "cached")
        live = self._live_job(stage, record)
        if live and record.get("key") == stage.key and not any(d.name in self.new for d in stage.deps):
            self.jobs[stage.name], state[stage.name] = live, ("queued", "")
            status = "running" if self.states[live] == "RUNNING" else "queued"
            return progress(stage.name, status, note=f"   job {live}")
        if live:  # planned differently now, or what it waits for is submitted again
            self._cancel(live)
        job = self.submit(stage, [self.jobs[d.name] for d in stage.deps if d.name in self.jobs])
        self.jobs[stage.name], state[stage.name] = job, ("queued", "")
        progress(stage.name, "submitted", note=f"   job {job}")

    def _report(self, report: Stage, progress) -> str | None:
        """Submit the report after every task (or keep the one already queued for them);
        None when nothing is pending and the report can be written right here."""
        after = sorted({self.jobs[d.name] for d in report.deps if d.name in self.jobs})
        if not after:
            return None
        record = runner.read_record(report.folder)
        live = self._live_job(report, record)
        if live and set(after) <= set(record.get("after") or []):  # it already waits for all of them
            progress(report.name, "queued", note=f"   job {live}")
            return live
        if live:
            self._cancel(live)
        job = self.submit(report, after, kind="afterany")
        progress(report.name, "submitted", note=f"   job {job}")
        return job

    def run(self, wait: bool) -> Outcome:
        progress, state = Progress(self.stages, 1), {}
        for stage in self.stages[:-1]:
            self._stage(stage, progress, state)
        report = self.stages[-1]
        tic = time.perf_counter()
        job = self._report(report, progress)
        if job is None:  # everything finished: write the report here
            runner.run(report.spec())
            return _finish_report(report, progress, tic)
        pending = sorted({*self.jobs.values(), job}, key=int)
        if not wait:
            print(f"\n{len(self.new)} job(s) submitted, {len(pending) - len(self.new)} already queued "
                  f"or running; the report is job {job}. Run the same command again to see what "
                  "finished, or add --wait.", flush=True)
            return Outcome(dict(progress.statuses), pending=pending)
        return self._wait(report, job, progress, tic)

    def _wait(self, report: Stage, job: str, progress, tic) -> Outcome:
        print(f"\nwaiting for {len(self.jobs)} job(s) (squeue every {self.cfg.slurm.poll_s:g} s)...",
              flush=True)
        while True:
            states = job_states()
            cancel_never_satisfied(states, self.jobs.values())
            if states.get(job) not in LIVE:
                break
            time.sleep(self.cfg.slurm.poll_s)
        statuses = dict(progress.statuses)
        for stage in self.stages[:-1]:
            if statuses.get(stage.name) in ("submitted", "queued", "running"):
                record = runner.read_record(stage.folder)
                ran = "pid" in record  # else settled for it: a stage it needs failed
                statuses[stage.name] = ("FAILED" if ran and record.get("status") == "failed"
                                        else record.get("status", "unknown"))
                if record.get("reason"):
                    print(f"      {stage.name}: {statuses[stage.name]}: {record['reason']}", flush=True)
        progress.statuses = statuses
        return _finish_report(report, progress, tic, line=False)


# ----------------------------------------------------------------------------- dry run

def dry_run(cfg, out: Path, stages: list[Stage]) -> None:
    """Each stage's command(s) and resources, and for SLURM the sbatch script of each kind of
    stage; nothing runs and nothing is written."""
    _header(cfg, stages)
    scripts = {}
    for stage in stages:
        record = runner.read_record(stage.folder)
        cached = cache_check(stage, record, True) is None and not stage.source
        print(f"\n{stage.name}  [{stage.kind}]  {'cached' if cached else 'would run'}")
        if stage.source:
            print(f"  weights: {stage.weights}  (the bench resolves {stage.source['kind']} itself)")
        for command in stage.commands:
            argv = runner.launch_argv(command, stage.launch, 0, ["<first node>"], "0")
            print("  $ " + " ".join(map(_quote, argv)))
        if cfg.executor == "slurm" and not stage.source:
            r = stage.resources
            print(f"  resources: {r.nodes} node(s) x {r.gpus_per_node} GPU(s), {r.cpus_per_task} CPUs, "
                  f"{r.mem_gb:g} GB, {r.time_min} min" + (f", partition {r.partition}" if r.partition else "")
                  + (f", {' '.join(r.sbatch)}" if r.sbatch else ""))
            deps = [d.name for d in stage.deps if not d.source]
            kind = "afterany" if stage.kind == "report" else "afterok"
            params = sbatch_parameters(cfg, stage, [f"<job of {d}>" for d in deps[:1]] if deps else [], kind)
            scripts.setdefault(stage.kind, (stage, params))
        elif cfg.executor == "local" and not stage.source:
            print(f"  processes: {stage.launch['nproc']} on this machine")
    for kind, (stage, params) in scripts.items():
        # submitit's own script text (a private function: the script it would submit)
        from submitit.slurm.slurm import _make_sbatch_string

        folder = stage.folder / "slurm"
        text = _make_sbatch_string(command=f"{sys.executable} -u -m submitit.core._submit {_quote(str(folder))}",
                                   folder=folder, **params)
        print(f"\n# sbatch script of the {kind} stages (e.g. {stage.name}; submitit writes it):\n{text}")


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)
