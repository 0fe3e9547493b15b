"""The bench's stages, planned in full before any runs: what each runs (argv lists), what
it depends on, its cache key, the files it reads and writes, and what it asks SLURM for.

A stage's key hashes what decides its outputs (its command, the contents of the config
files it names, its seed, its launch) and the keys of the stages it depends on, so a
change anywhere upstream re-runs everything downstream of it, and keys are known before
anything ran (an executor can submit a whole chain at once).
"""
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from mocobench.config import read_yaml
from mocobench.fileio import sha256_file, slug
from transfer import bench_sources
from transfer.stage import digest
from transfer.bench import BenchConfig, Pretraining, Resources, Task, resources_for

# Free space a stage needs at least (logs, results, a feature cache of the demo's size).
STAGE_MIN_FREE = 256 * 2**20
CONVERTED = {"torchvision": "torchvision.pth", "detectron2": "detectron2.pkl", "mmseg": "mmseg.pth"}
# How each task takes its (fine-tuning) seed. Tasks configured through mocobench.config
# (linear, knn, the classification suite) take the override seed=S; Detectron2-style detect
# configs take SEED S as a trailing pair; segment has --seed (it sets mmengine's
# randomness.seed). A task that differs says so with `seed_args` in the bench config.
SEED_ARGS = {"detect": ["SEED", "{seed}"], "segment": ["--seed", "{seed}"]}
DEFAULT_SEED_ARGS = ["seed={seed}"]


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _files_in(args: list[str]) -> dict[str, str]:
    """Content hashes of every argument that names a file (configs), so editing one re-runs."""
    return {a: sha256_file(a) for a in args if os.path.isfile(a)}


@dataclass
class Stage:
    name: str  # also its folder under the bench's output
    kind: str  # pretrain | convert | report | the task (detect, ...): picks its resources
    folder: Path
    parts: dict  # what the key hashes, besides the dependencies' keys
    deps: list["Stage"] = field(default_factory=list)
    commands: list[list[str]] = field(default_factory=list)  # [module, args...] each
    launch: dict = field(default_factory=lambda: {"style": "python", "nproc": 1, "nodes": 1})
    inputs: list[str] = field(default_factory=list)  # files read: their sha256 is recorded
    outputs: list[str] = field(default_factory=list)  # files a finished stage has left
    need_bytes: int = STAGE_MIN_FREE
    weights: Path | None = None  # the weights the stage reads, or (a source) provides
    result: dict | None = None  # task stages: what a "failed" results.json says
    source: dict | None = None  # resolved by the bench itself: baseline weights
    resources: Resources | None = None
    requeue: bool = False  # resumes from its own checkpoint when SLURM requeues it
    what: str = ""  # in dependants' reasons: "pretraining failed: ..."

    @property
    def key(self) -> str:
        return _hash({**self.parts, "deps": [d.key for d in self.deps]})

    def spec(self) -> dict:
        """What transfer.stage needs to run it (JSON)."""
        return {"name": self.name, "kind": self.kind, "folder": str(self.folder), "key": self.key,
                "parts": self.parts, "deps": [d.name for d in self.deps], "commands": self.commands,
                "launch": self.launch, "inputs": self.inputs, "outputs": self.outputs,
                "need_bytes": self.need_bytes, "result": self.result, "what": self.what,
                "weights": str(self.weights) if self.weights else None}


def _launch(style: str, nproc: int, res: Resources) -> dict:
    return {"style": style, "nproc": nproc, "nodes": res.nodes}


def _source_stage(row: Pretraining, seed: int | None, name: str, folder: Path, res) -> Stage:
    """A row whose weights the bench finds (or draws) itself."""
    if row.kind == "random":
        s = row.seed if seed is None else seed
        weights = folder / f"random_init_{row.arch}_seed{s}.pth"
        source, parts = {"kind": "random", "arch": row.arch, "seed": s}, {"arch": row.arch, "seed": s}
    elif row.kind == "checkpoint":
        weights = Path(row.path).absolute()
        source = {"kind": "checkpoint", "path": row.path}
        parts = {"path": str(weights), "sha256": digest(weights)}
    else:  # imagenet_supervised: a given file, or torchvision's (its name carries its checksum)
        url = row.url or (bench_sources.imagenet_weights_entry(row.arch).url if not row.path else "")
        weights = Path(row.path).absolute() if row.path else bench_sources.hub_file(url)
        source = {"kind": "imagenet_supervised", "arch": row.arch, "path": row.path, "url": row.url}
        parts = ({"path": str(weights), "sha256": digest(weights)} if row.path
                 else {"file": weights.name})
    return Stage(name, "pretrain", folder, {"source": parts}, outputs=[str(weights)], weights=weights,
                 source={**source, "label": row.label}, resources=res, what="pretraining")


def _pretrain_stage(cfg, out: Path, row: Pretraining, seed: int | None, run: str) -> Stage:
    name = f"pretrain/{run}"
    folder = out / name
    res = resources_for(cfg, "pretrain", row.resources, f"pretraining {row.label!r}")
    if row.kind != "pretrain":
        return _source_stage(row, seed, name, folder, res)
    overrides = [*row.overrides, *([f"train.seed={seed}"] if seed is not None else [])]
    launch = _launch("torchrun", row.nproc, res)
    parts = {"config": read_yaml(row.config),  # resolves _base_, so a base edit re-runs too
             "overrides": overrides, **({"launch": launch} if launch["nproc"] * launch["nodes"] > 1 else {})}
    weights = folder / "checkpoint_last.pth"
    command = ["pretrain", "--config", row.config, "--output", str(folder), *overrides]
    return Stage(name, "pretrain", folder, parts, commands=[command], launch=launch,
                 outputs=[str(weights)], weights=weights, resources=res, requeue=True,
                 what="pretraining")


def _convert_stage(cfg, out: Path, pre: Stage, run: str) -> Stage:
    name = f"convert/{run}"
    folder = out / name
    targets = [folder / CONVERTED[fmt] for fmt in cfg.formats]
    commands = [["converters", fmt, str(pre.weights), str(t)] for fmt, t in zip(cfg.formats, targets)]
    size = pre.weights.stat().st_size if pre.weights and pre.weights.is_file() else 0
    return Stage(name, "convert", folder, {"formats": cfg.formats}, deps=[pre], commands=commands,
                 inputs=[str(pre.weights)], outputs=[str(t) for t in targets],
                 need_bytes=max(STAGE_MIN_FREE, len(cfg.formats) * size), weights=pre.weights,
                 resources=resources_for(cfg, "convert", {}, "convert"), what="conversion")


def seed_args(task: Task, seed: int) -> list[str]:
    template = task.seed_args or SEED_ARGS.get(task.task, DEFAULT_SEED_ARGS)
    return [a.replace("{seed}", str(seed)) for a in template]


def _task_stage(cfg, out: Path, task: Task, row: Pretraining, conv: Stage, run: str,
                seed: int | None) -> Stage:
    name = f"{task.name}/{run}" + (f"/seed{seed}" if seed is not None else "")
    folder = out / name
    res = resources_for(cfg, task.task, task.resources, f"task {task.name!r}")
    engine = task.args[task.args.index("--engine") + 1] if "--engine" in task.args[:-1] else "auto"
    style = "detectron2" if task.task == "detect" and engine != "torchvision" else "torchrun"
    launch = _launch(style, task.nproc, res)
    several = launch["nproc"] * launch["nodes"] > 1
    extra = ["--launcher", "pytorch"] if task.task == "segment" and several else []
    seeded = seed_args(task, seed) if seed is not None else []
    # the task's own arguments last: detect takes trailing KEY VALUE pairs
    command = ["transfer", task.task, *extra, "--weights", str(conv.weights), "--output", str(folder),
               "--label", row.label, *task.args, *seeded]
    parts = {"task": task.task, "args": task.args, "files": _files_in(task.args), "seed": seed,
             **({"launch": launch} if several else {})}
    size = conv.weights.stat().st_size if conv.weights and conv.weights.is_file() else 2**28
    return Stage(name, task.task, folder, parts, deps=[conv], commands=[command], launch=launch,
                 inputs=[str(conv.weights)], outputs=[str(folder / "results.json")],
                 # fine-tuned checkpoints with optimizer state, logs, features
                 need_bytes=STAGE_MIN_FREE + 4 * size, weights=conv.weights, resources=res,
                 result={"task": task.task, "label": row.label, "args": task.args, "seed": seed})


def runs_of(row: Pretraining) -> list[tuple[int | None, str]]:
    """(pretraining seed or None, folder name) of each run of a row."""
    if not row.seeds:
        return [(None, slug(row.label))]
    return [(s, f"{slug(row.label)}-seed{s}") for s in row.seeds]


def plan(cfg: BenchConfig, out: Path) -> list[Stage]:
    """Every stage of the bench, each after the stages it depends on; the report last."""
    stages, converts = [], {}
    for row in cfg.pretrainings:
        for seed, run in runs_of(row):
            pre = _pretrain_stage(cfg, out, row, seed, run)
            conv = _convert_stage(cfg, out, pre, run)
            stages += [pre, conv]
            converts.setdefault(row.label, []).append((run, conv))
    tasks = []
    for task in cfg.tasks:
        for row in cfg.pretrainings:
            if task.rows and row.label not in task.rows:
                continue
            for run, conv in converts[row.label]:
                for seed in task.seeds or [None]:
                    tasks.append(_task_stage(cfg, out, task, row, conv, run, seed))
    stages += tasks
    report_folder = out / "report"
    report = Stage("report", "report", report_folder, {"format": cfg.report_format},
                   deps=tasks, resources=resources_for(cfg, "report", {}, "report"),
                   commands=[["transfer.stage", "--finish", str(out / "bench_plan.json")],
                             ["transfer", "report", str(out), "--format", cfg.report_format,
                              "--output", str(report_folder)]],
                   outputs=[str(report_folder / "report.md")], need_bytes=2**20)
    return [*stages, report]
