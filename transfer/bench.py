"""One command from pretraining to comparison tables.

    python -m transfer bench --config configs/bench/demo.yaml --output DIR

Stages run in order, each in its own folder under DIR:

    pretrain/<row>/          python -m pretrain (or: the weights file of a baseline row)
    convert/<row>/           python -m converters {torchvision,detectron2,mmseg}, verified
    <task>/<row>/            python -m transfer {linear,knn,detect,segment} -> results.json
    report/                  python -m transfer report -> tables, report.md, charts

Each stage runs as its own process through the documented CLI, so the bench does
nothing a user could not do by hand, and a crash in one stage cannot take the
others down. A stage is skipped when a finished run with the same key exists in
its folder (``stage.json``: the hash of its command, the config files it reads
and the weights it evaluates), so an interrupted bench resumes where it stopped
(pretraining itself resumes from its last checkpoint) and a re-run is instant.
A failed stage is reported and written as a "failed" row; stages that depend on
it are marked so and the others still run. With ``jobs: N`` independent stages
run N at a time (each row's pretrain + convert, then the tasks).
"""
import argparse
import contextlib
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mocobench.config import load_config, read_yaml
from mocobench.errors import UserError, cli, one_line
from mocobench.fileio import atomic_json, ensure_room, sha256_file
from transfer.results import weights_record, write_results

# Free space a stage needs at least (logs, results, a feature cache of the demo's size).
STAGE_MIN_FREE = 256 * 2**20

# torchvision's ImageNet-1k ResNet-50 weights, by file name as torch.hub caches them.
IMAGENET_RESNET50_FILES = {
    "resnet50-0676ba61.pth": "ResNet50_Weights.IMAGENET1K_V1 (76.1 top-1), "
                             "https://download.pytorch.org/models/resnet50-0676ba61.pth",
    "resnet50-11ad3fa6.pth": "ResNet50_Weights.IMAGENET1K_V2 (80.9 top-1), "
                             "https://download.pytorch.org/models/resnet50-11ad3fa6.pth",
}


@dataclass
class Pretraining:
    label: str  # the row name in every table
    # pretrain: train with `python -m pretrain --config CONFIG`; checkpoint: an existing file
    # (PATH); imagenet_supervised: torchvision's ImageNet weights from PATH or torch's hub
    # cache; random: a seeded random initialisation of ARCH
    kind: str = "pretrain"
    config: str = ""
    overrides: list[str] = field(default_factory=list)
    path: str = ""
    arch: str = "resnet50"
    seed: int = 0
    nproc: int = 1  # processes for pretraining (torchrun --nproc_per_node), e.g. 8 GPUs


@dataclass
class Task:
    name: str  # folder name, e.g. linear
    task: str  # linear | knn | detect | segment
    args: list[str] = field(default_factory=list)  # the task's own CLI arguments
    rows: list[str] = field(default_factory=list)  # labels to evaluate (empty: every row)
    nproc: int = 1  # >1: launched with torchrun (linear paper protocol, segment --launcher pytorch)


@dataclass
class BenchConfig:
    name: str = "bench"
    scale: str = ""  # printed at start: what scale this bench runs at, honestly
    pretrainings: list[Pretraining] = field(default_factory=list)
    tasks: list[Task] = field(default_factory=list)
    formats: list[str] = field(default_factory=lambda: ["torchvision", "detectron2", "mmseg"])
    report_format: str = "github"
    # Stages run at once. Pretraining and converting a row is one chain, chains run side by
    # side, then the tasks do; each stage gets cores/jobs threads. On a 2-core CPU two 1-thread
    # processes get more done than one 2-thread process (small tensors, per-op overhead): the
    # demo bench takes 9:31-9:39 with 2 and 13:29 with 1. On a GPU node leave it at 1: each stage
    # already fills the node (nproc).
    jobs: int = 1


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-") or "row"


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _files_in(args: list[str]) -> dict[str, str]:
    """Content hashes of every argument that names a file (configs), so editing one re-runs."""
    return {a: sha256_file(a) for a in args if os.path.isfile(a)}


def _fmt(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def launcher(nproc: int) -> list[str]:
    """How to start a module: python -m, or torchrun for several processes on this machine."""
    if nproc <= 1:
        return [sys.executable, "-m"]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            "--rdzv-backend=c10d", "--rdzv-endpoint=127.0.0.1:0", "-m"]


def imagenet_weights(path: str) -> Path:
    """The supervised ImageNet ResNet-50 file, or a UserError saying where to put it."""
    if path:
        if Path(path).is_file():
            return Path(path)
        raise UserError(f"supervised ImageNet weights {path} do not exist; place the torchvision "
                        "ResNet-50 file there or remove the path to use torch's hub cache")
    import torch.hub

    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for name in IMAGENET_RESNET50_FILES:
        if (cache / name).is_file():
            return cache / name
    name, source = next(iter(IMAGENET_RESNET50_FILES.items()))
    raise UserError(f"supervised ImageNet weights not found and this machine cannot download them: "
                    f"place {name} ({source}) in {cache}/ or give its path in the bench config")


class Bench:
    def __init__(self, cfg: BenchConfig, out: Path):
        self.cfg, self.out = cfg, out
        self.python = sys.executable
        self.weights: dict[str, Path | None] = {}  # row label -> weights file (None: unavailable)
        self.problem: dict[str, tuple[str, str]] = {}  # row label -> (status, reason)
        # Every stage, so the ETA can price each remaining one by its kind.
        self.plan = ([f"pretrain/{slug(p.label)}" for p in cfg.pretrainings]
                     + [f"convert/{slug(p.label)}" for p in cfg.pretrainings]
                     + [f"{t.name}/{slug(p.label)}" for t in cfg.tasks for p in self.rows_of(t)]
                     + ["report"])
        self.stages_total = len(self.plan)
        self.remaining = list(self.plan)  # concurrent stages finish out of plan order
        self.done, self.start = 0, time.perf_counter()
        self.timed: dict[str, list[float]] = {}  # stage kind -> seconds of stages that ran
        self.summary: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()  # progress lines and counters, from concurrent stages
        self.env = os.environ.copy()
        if cfg.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
            # concurrent stages share the cores instead of each taking all of them
            self.env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cfg.jobs))

    def rows_of(self, task: Task) -> list[Pretraining]:
        return [p for p in self.cfg.pretrainings if not task.rows or p.label in task.rows]

    # ---------------------------------------------------------------- one stage
    def progress(self, name: str, status: str, seconds: float) -> None:
        """One line per stage. The ETA prices each remaining stage at the mean time of the
        stages of its kind (pretrain, convert, a task) that ran to completion; kinds not yet
        timed are counted, not guessed (a pretraining is not what a kNN costs)."""
        with self.lock:
            self._progress(name, status, seconds)

    def _progress(self, name: str, status: str, seconds: float) -> None:
        self.done += 1
        self.remaining.remove(name)
        if status == "done":
            self.timed.setdefault(name.split("/")[0], []).append(seconds)
        eta, untimed = 0.0, 0
        for stage in self.remaining:
            times = self.timed.get(stage.split("/")[0])
            if times:
                eta += sum(times) / len(times) / self.cfg.jobs
            else:
                untimed += 1
        eta_text = f"ETA ~{_fmt(eta)}" + (f" + {untimed} stage(s) not yet timed" if untimed else "")
        elapsed = time.perf_counter() - self.start
        print(f"[{self.done:2d}/{self.stages_total}] {name:40s} {status:8s} {_fmt(seconds):>6s}"
              f"   elapsed {_fmt(elapsed)}, {eta_text}", flush=True)
        self.summary.append((name, status, _fmt(seconds)))

    def run_stage(self, name: str, folder: Path, key_parts: dict, cmd: list[str] | None = None,
                  fn=None, need_bytes: int = STAGE_MIN_FREE) -> tuple[bool, str]:
        """Run `cmd` (a subprocess, output to folder/stage.log) or `fn` unless cached,
        after checking that `need_bytes` can be written to `folder`. Returns (ok, reason)."""
        record_path = folder / "stage.json"
        key = _hash(key_parts)
        previous = json.loads(record_path.read_text()) if record_path.exists() else {}
        if previous.get("key") == key and previous.get("status") == "done":
            self.progress(name, "cached", 0.0)
            return True, ""
        tic, started = time.perf_counter(), time.time()
        reason = ""
        try:
            ensure_room(folder, need_bytes, f"the {name} stage's outputs")
            if cmd is not None:
                with open(folder / "stage.log", "w") as log:
                    log.write("$ " + " ".join(cmd) + "\n")
                    log.flush()
                    code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                                          env=self.env).returncode
                if code != 0:
                    lines = (folder / "stage.log").read_text(errors="replace").splitlines()
                    errors = [x for x in lines if x.startswith("error: ")]
                    reason = (errors[-1][7:] if errors else (lines[-1] if lines else f"exit {code}"))
                    reason = f"{reason} (log: {folder / 'stage.log'})"
            else:
                fn()
        except UserError as e:
            reason = one_line(str(e))
        seconds = time.perf_counter() - tic
        ok = not reason
        with contextlib.suppress(OSError):  # an unwritable folder: the reason is printed below
            atomic_json({"key": key, "status": "done" if ok else "failed", "reason": reason,
                         "started": round(started, 3), "seconds": round(seconds, 1),
                         "parts": key_parts}, record_path)
        self.progress(name, "done" if ok else "FAILED", seconds)
        if not ok:
            print(f"      {name}: {reason}", flush=True)
        return ok, reason

    # ---------------------------------------------------------------- stages
    def pretrain(self, row: Pretraining) -> None:
        folder = self.out / "pretrain" / slug(row.label)
        name = f"pretrain/{slug(row.label)}"
        if row.kind == "pretrain":
            config = read_yaml(row.config)  # resolves _base_, so a base edit re-runs too
            cmd = [*launcher(row.nproc), "pretrain", "--config", row.config, "--output", str(folder),
                   *row.overrides]
            ok, reason = self.run_stage(name, folder, {"config": config, "overrides": row.overrides},
                                        cmd=cmd)
            self.weights[row.label] = folder / "checkpoint_last.pth" if ok else None
            if not ok:
                self.problem[row.label] = ("failed", f"pretraining failed: {reason}")
        elif row.kind == "random":
            target = folder / f"random_init_{row.arch}_seed{row.seed}.pth"

            def write_random():
                import torch
                import torchvision

                from mocobench.fileio import atomic_torch_save

                torch.manual_seed(row.seed)
                model = torchvision.models.get_model(row.arch, weights=None)
                atomic_torch_save(model.state_dict(), target)

            ok, reason = self.run_stage(name, folder, {"arch": row.arch, "seed": row.seed},
                                        fn=write_random)
            self.weights[row.label] = target if ok else None
        else:
            def locate():
                path = imagenet_weights(row.path) if row.kind == "imagenet_supervised" else Path(row.path)
                if not path.is_file():
                    raise UserError(f"checkpoint {path} of row {row.label!r} does not exist")
                (folder / "weights.txt").write_text(str(path.resolve()) + "\n")

            if row.kind not in ("checkpoint", "imagenet_supervised"):
                raise UserError(f"pretraining {row.label!r}: kind must be pretrain, checkpoint, "
                                f"imagenet_supervised or random, not {row.kind!r}")
            # never cached: the file may appear or change between runs
            ok, reason = self.run_stage(name, folder, {"path": row.path, "t": time.time()}, fn=locate)
            self.weights[row.label] = Path((folder / "weights.txt").read_text().strip()) if ok else None
            if not ok:
                self.problem[row.label] = ("missing", reason)

    def convert(self, row: Pretraining) -> None:
        name = f"convert/{slug(row.label)}"
        folder = self.out / "convert" / slug(row.label)
        weights = self.weights.get(row.label)
        if weights is None:
            self.progress(name, "skipped", 0.0)
            return
        targets = {"torchvision": "torchvision.pth", "detectron2": "detectron2.pkl", "mmseg": "mmseg.pth"}
        cmd = ["sh", "-c", " && ".join(
            f"{self.python} -m converters {fmt} '{weights}' '{folder / targets[fmt]}'"
            for fmt in self.cfg.formats)]
        ok, reason = self.run_stage(name, folder, {"weights": sha256_file(weights),
                                                   "formats": self.cfg.formats}, cmd=cmd,
                                    need_bytes=len(self.cfg.formats) * weights.stat().st_size)
        if not ok:
            self.problem[row.label] = ("failed", f"conversion failed: {reason}")

    def task(self, task: Task, row: Pretraining) -> None:
        name = f"{task.name}/{slug(row.label)}"
        folder = self.out / task.name / slug(row.label)
        weights = self.weights.get(row.label)
        if row.label in self.problem or weights is None:
            status, reason = self.problem.get(row.label, ("missing", "no weights"))
            write_results(folder, task=task.task, dataset={"name": "", "splits": {}},
                          weights={"path": None, "sha256": None, "label": row.label},
                          engine="", protocol="", config={"args": task.args}, seed=0,
                          wall_time_s=0.0, metrics={}, status=status, reason=reason)
            self.progress(name, status, 0.0)
            return
        # the task's own arguments last: detect takes trailing KEY VALUE pairs
        cmd = [*launcher(task.nproc), "transfer", task.task, "--weights", str(weights),
               "--output", str(folder), "--label", row.label, *task.args]
        ok, reason = self.run_stage(name, folder, {"args": task.args, "files": _files_in(task.args),
                                                   "weights": sha256_file(weights)}, cmd=cmd,
                                    # fine-tuned checkpoints with optimizer state, logs, features
                                    need_bytes=STAGE_MIN_FREE + 4 * weights.stat().st_size)
        if not ok:
            with contextlib.suppress(OSError):  # the folder may be what failed
                write_results(folder, task=task.task, dataset={"name": "", "splits": {}},
                              weights=weights_record(weights, row.label), engine="", protocol="",
                              config={"args": task.args}, seed=0, wall_time_s=0.0, metrics={},
                              status="failed", reason=reason)

    def run_all(self, stages) -> None:
        """Call each of `stages`, in order, `jobs` at a time (they are independent)."""
        if self.cfg.jobs <= 1:
            for stage in stages:
                stage()
            return
        with ThreadPoolExecutor(self.cfg.jobs) as pool:
            for future in [pool.submit(stage) for stage in stages]:
                future.result()  # re-raises a stage's unexpected error here

    def report(self) -> str:
        from transfer.report import report

        text, _ = report([self.out], fmt=self.cfg.report_format, output=self.out / "report")
        return text

    def run(self) -> str:
        print(f"bench {self.cfg.name}: {len(self.cfg.pretrainings)} pretrainings x "
              f"{len(self.cfg.tasks)} tasks, {self.stages_total} stages -> {self.out}", flush=True)
        if self.cfg.scale:
            print(f"scale: {self.cfg.scale}", flush=True)
        if self.cfg.jobs > 1:
            print(f"jobs: {self.cfg.jobs} stages at once, "
                  f"OMP_NUM_THREADS={self.env.get('OMP_NUM_THREADS', 'unset')}", flush=True)
        self.run_all([lambda r=row: (self.pretrain(r), self.convert(r))
                      for row in self.cfg.pretrainings])
        self.run_all([lambda t=task, r=row: self.task(t, r)
                      for task in self.cfg.tasks for row in self.rows_of(task)])
        tic = time.perf_counter()
        try:
            text, status = self.report(), "done"
        except UserError as e:  # e.g. no stage could write its results
            text, status = f"no report: {one_line(str(e))}", "FAILED"
        self.progress("report", status, time.perf_counter() - tic)
        print(f"\nbench finished in {_fmt(time.perf_counter() - self.start)}; "
              f"tables in {self.out / 'report' / 'report.md'}\n", flush=True)
        print(text, flush=True)
        return text


def run_bench(config_path, output, overrides: list[str] | None = None) -> str:
    cfg = load_config(BenchConfig, config_path, overrides)
    if not cfg.pretrainings or not cfg.tasks:
        raise UserError(f"bench config {config_path} needs at least one pretraining and one task")
    labels = [p.label for p in cfg.pretrainings]
    if len(set(map(slug, labels))) != len(labels):
        raise UserError(f"bench config {config_path}: pretraining labels must be distinct: {labels}")
    if cfg.jobs < 1:
        raise UserError(f"bench config {config_path}: jobs must be 1 or more, not {cfg.jobs}")
    for t in cfg.tasks:
        if t.task not in ("linear", "knn", "detect", "segment"):
            raise UserError(f"bench task {t.name!r}: task must be linear, knn, detect or segment")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    return Bench(cfg, out).run()


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m transfer bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="bench YAML, e.g. configs/bench/demo.yaml")
    p.add_argument("--output", required=True, help="folder for every stage's outputs")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the bench config")
    args = p.parse_args(argv)
    run_bench(args.config, args.output, args.overrides)
