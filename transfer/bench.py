"""One command from pretraining to comparison tables.

    python -m transfer bench --config configs/bench/demo.yaml --output DIR [--dry-run] [--wait]

Stages, each in its own folder under DIR:

    pretrain/<row>/          python -m pretrain (or: the weights file of a baseline row)
    convert/<row>/           python -m converters {torchvision,detectron2,mmseg}, verified
    <task>/<row>/            python -m transfer TASK (any task of `python -m transfer`) -> results.json
    report/                  python -m transfer report -> tables, report.md, charts

With ``seeds:`` a pretraining row becomes one run per pretraining seed (<row>-seed<S>) and a
task one stage per fine-tuning seed (<task>/<row>/seed<S>); rows sharing a label are
aggregated by `report`.

Each stage runs as its own process through the documented CLI (argv lists, no shell), so
the bench does nothing a user could not do by hand, and a crash in one stage cannot take
the others down. A stage is skipped when a finished run with the same key exists in its
folder (``stage.json``: the hash of its command, the config files it reads, its seed and
the keys of the stages it depends on) and its outputs are still there, so an interrupted
bench resumes where it stopped (pretraining itself resumes from its last checkpoint) and a
re-run is instant. A failed stage is written as a "failed" row; stages that depend on it
are marked so and the others still run.

Executors (``executor:`` in the config): ``local`` runs the stages on this machine,
``jobs`` at a time; ``slurm`` submits each stage as a SLURM job through submitit, with
its resources from ``slurm.resources`` and SLURM ``afterok`` dependencies, then exits (or
waits with --wait); running the bench again collects what finished and submits nothing
that is still queued or running. The whole config is checked before anything runs;
--dry-run prints each stage's command and resources (and sbatch script) and runs nothing.
"""
import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mocobench.config import check_rules, from_dict, load_config, setting
from mocobench.errors import UserError, cli
from mocobench.fileio import slug

FORMATS = ("torchvision", "detectron2", "mmseg")
KINDS = ("pretrain", "checkpoint", "imagenet_supervised", "random")
NOT_TASKS = ("bench", "report")  # `python -m transfer` commands that are not transfer tasks
STAGE_FOLDERS = ("pretrain", "convert", "report", "slurm")


@dataclass
class Pretraining:
    label: str = ""  # the row name in every table
    # pretrain: train with `python -m pretrain --config CONFIG`; checkpoint: an existing file
    # (PATH); imagenet_supervised: torchvision's ImageNet weights of ARCH from PATH, torch's hub
    # cache, or downloaded from URL (default: torchvision's own); random: a seeded random
    # initialisation of ARCH
    kind: str = setting("pretrain", choices=KINDS)
    config: str = ""
    overrides: list[str] = field(default_factory=list)
    path: str = ""
    url: str = ""
    arch: str = "resnet50"
    seed: int = 0  # of kind random
    # pretraining seeds: one run each (train.seed=S for kind pretrain, the draw for random)
    seeds: list[int] = field(default_factory=list)
    nproc: int = setting(1, ge=1)  # processes per node (torchrun --nproc_per_node), e.g. 8 GPUs
    resources: dict = field(default_factory=dict)  # SLURM resources of this row's pretraining


@dataclass
class Task:
    name: str = ""  # folder name, e.g. linear
    task: str = ""  # a task of `python -m transfer`: linear, knn, detect, segment, ...
    args: list[str] = field(default_factory=list)  # the task's own CLI arguments
    rows: list[str] = field(default_factory=list)  # labels to evaluate (empty: every row)
    seeds: list[int] = field(default_factory=list)  # fine-tuning seeds: one stage each
    # how the task takes a seed, {seed} replaced (default: see bench_plan.SEED_ARGS)
    seed_args: list[str] = field(default_factory=list)
    nproc: int = setting(1, ge=1)  # >1: launched with torchrun (or Detectron2's launcher)
    resources: dict = field(default_factory=dict)  # SLURM resources of this task's stages


@dataclass
class Resources:
    """What one stage asks SLURM for. One task per node starts the tool's own launcher."""
    nodes: int = setting(1, ge=1)
    gpus_per_node: int = setting(0, ge=0)
    cpus_per_task: int = setting(2, ge=1)  # per node
    mem_gb: float = setting(8.0, gt=0)  # per node
    time_min: int = setting(60, ge=1)
    partition: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    sbatch: list[str] = field(default_factory=list)  # more flags, e.g. ["--exclusive"]


@dataclass
class SlurmSettings:
    # stage kind (pretrain, convert, report, or a task such as detect) -> Resources fields;
    # "default" applies to every kind, a row's or task's own `resources` last
    resources: dict = field(default_factory=dict)
    signal_delay_s: int = setting(120, ge=10)  # USR2 this long before the time limit: requeue
    max_requeues: int = setting(3, ge=0)  # time-outs a stage may be requeued after
    poll_s: float = setting(30.0, gt=0)  # --wait: how often squeue is asked


@dataclass
class BenchConfig:
    name: str = "bench"
    scale: str = ""  # printed at start: what scale this bench runs at, honestly
    pretrainings: list[Pretraining] = field(default_factory=list)
    tasks: list[Task] = field(default_factory=list)
    formats: list[str] = setting(list(FORMATS), choices=FORMATS)
    report_format: str = "github"
    # Stages run at once (executor local). Stages run as soon as what they need is done,
    # `jobs` at a time; each gets cores/jobs threads. On a 2-core CPU two 1-thread processes
    # get more done than one 2-thread process (small tensors, per-op overhead): the demo bench
    # took 9:31 with 2 and 13:29 with 1 (its earlier, shorter tasks). On a GPU node leave it
    # at 1: each stage already fills the node (nproc).
    jobs: int = setting(1, ge=1)
    executor: str = setting("local", choices=("local", "slurm"))
    slurm: SlurmSettings = field(default_factory=SlurmSettings)


# ----------------------------------------------------------------------------- validation

def _task_names() -> list[str]:
    from transfer.__main__ import TASKS

    return [name for name in TASKS if name not in NOT_TASKS]


def resources_for(cfg: BenchConfig, kind: str, own: dict, where: str) -> Resources:
    """Resources of one stage: the defaults, slurm.resources.default, slurm.resources[kind],
    then the row's or task's own `resources`, each checked against Resources' fields."""
    merged: dict = {}
    for part, name in ((cfg.slurm.resources.get("default") or {}, "slurm.resources.default"),
                       (cfg.slurm.resources.get(kind) or {}, f"slurm.resources.{kind}"),
                       (own or {}, f"{where}.resources")):
        if not isinstance(part, dict):
            raise UserError(f"bench config: {name} must be a mapping of resource fields, not {part!r}")
        merged.update(part)
    try:
        res = from_dict(Resources, merged)
    except UserError as e:
        raise UserError(f"bench config, resources of {where}: {e}") from None
    for flag in res.sbatch:
        if not flag.startswith("--"):
            raise UserError(f"bench config, resources of {where}: sbatch flag {flag!r} must be a long "
                            "option such as --exclusive or --reservation=NAME")
    return res


def _check_pretraining(i: int, p: Pretraining) -> None:
    from pretrain.config import PretrainConfig

    where = f"pretrainings[{i}] ({p.label!r})"
    check_rules(p, f"pretrainings[{i}].")
    if p.kind == "pretrain":
        if not p.config:
            raise UserError(f"bench config, {where}: kind pretrain needs config: a pretrain YAML")
        try:
            load_config(PretrainConfig, p.config, p.overrides)
        except UserError as e:
            raise UserError(f"bench config, {where}: {e}") from None
    elif p.kind == "checkpoint" and not p.path:
        raise UserError(f"bench config, {where}: kind checkpoint needs path: the weights file")
    if p.seeds and p.kind not in ("pretrain", "random"):
        raise UserError(f"bench config, {where}: seeds need a row that trains or draws its weights "
                        f"(kind pretrain or random), not kind {p.kind}")
    if len(set(p.seeds)) != len(p.seeds):
        raise UserError(f"bench config, {where}: seeds repeat: {p.seeds}")


def _check_task(t: Task, labels: list[str], tasks: list[str]) -> None:
    where = f"task {t.name!r}"
    check_rules(t, f"task {t.name}.")
    if t.task not in tasks:
        raise UserError(f"bench config, {where}: task must be one of {', '.join(tasks)} "
                        f"(the tasks of python -m transfer), not {t.task!r}")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", t.name) or t.name in STAGE_FOLDERS:
        raise UserError(f"bench config, {where}: name is its folder: letters, digits, _ . - only, "
                        f"and not {', '.join(STAGE_FOLDERS)}")
    unknown = [r for r in t.rows if r not in labels]
    if unknown:
        raise UserError(f"bench config, {where}: rows {unknown} are not pretraining labels ({labels})")
    if "--config" in t.args:
        i = t.args.index("--config")
        config = t.args[i + 1] if i + 1 < len(t.args) else ""
        if not Path(config).is_file():
            raise UserError(f"bench config, {where}: its --config {config!r} does not exist")
    launcher_flags = {"--num-gpus", "--num-machines", "--machine-rank", "--dist-url", "--launcher"}
    given = sorted(launcher_flags & set(t.args))
    if given:
        raise UserError(f"bench config, {where}: the bench launches the task itself: drop {given} "
                        "from args and set nproc (processes per node) and resources.nodes instead")
    if len(set(t.seeds)) != len(t.seeds):
        raise UserError(f"bench config, {where}: seeds repeat: {t.seeds}")
    if t.seed_args and not any("{seed}" in a for a in t.seed_args):
        raise UserError(f"bench config, {where}: seed_args must contain {{seed}}, e.g. [--seed, '{{seed}}']")


def _check_launch(cfg: BenchConfig, kind: str, nproc: int, own: dict, where: str, engine: str = "") -> None:
    res = resources_for(cfg, kind, own, where)
    if cfg.executor == "local" and res.nodes > 1:
        raise UserError(f"bench config, {where}: several nodes need executor: slurm")
    if cfg.executor == "slurm" and res.gpus_per_node and res.gpus_per_node != nproc:
        raise UserError(f"bench config, {where}: nproc {nproc} processes per node but "
                        f"gpus_per_node {res.gpus_per_node}: each process takes one GPU; make them equal")
    if kind == "detect" and nproc * res.nodes > 1 and engine == "auto":
        raise UserError(f"bench config, {where}: several processes need --engine detectron2 or "
                        "--engine torchvision in args (the two engines start their processes differently)")


def validate(cfg: BenchConfig, where: str, need_cluster: bool = True) -> None:
    """Every check that can be made before a stage runs, each one line."""
    if not cfg.pretrainings or not cfg.tasks:
        raise UserError(f"bench config {where} needs at least one pretraining and one task")
    labels = [p.label for p in cfg.pretrainings]
    if not all(labels) or not all(t.name and t.task for t in cfg.tasks):
        raise UserError(f"bench config {where}: every pretraining needs a label, every task a name "
                        "and a task")
    if len(set(map(slug, labels))) != len(labels):
        raise UserError(f"bench config {where}: pretraining labels must be distinct: {labels}")
    names = [t.name for t in cfg.tasks]
    if len(set(names)) != len(names):
        raise UserError(f"bench config {where}: task names must be distinct: {names}")
    unknown = set(cfg.slurm.resources) - {"default", "pretrain", "convert", "report", *_task_names()}
    if unknown:
        raise UserError(f"bench config {where}: slurm.resources has {sorted(unknown)}; its keys are "
                        f"default, pretrain, convert, report or a task ({', '.join(_task_names())})")
    for i, p in enumerate(cfg.pretrainings):
        _check_pretraining(i, p)
        where_p = f"pretrainings[{i}] ({p.label!r})"
        resources_for(cfg, "pretrain", p.resources, where_p)
        if p.kind == "pretrain":  # the other kinds are resolved by the bench itself
            _check_launch(cfg, "pretrain", p.nproc, p.resources, where_p)
    tasks = _task_names()
    for t in cfg.tasks:
        _check_task(t, labels, tasks)
        engine = t.args[t.args.index("--engine") + 1] if "--engine" in t.args[:-1] else "auto"
        _check_launch(cfg, t.task, t.nproc, t.resources, f"task {t.name!r}", engine)
    for kind in ("convert", "report"):
        resources_for(cfg, kind, {}, kind)
    if cfg.executor == "slurm" and need_cluster:
        from transfer.executors import slurm_unavailable

        why = slurm_unavailable()
        if why:
            raise UserError(f"bench config {where}: executor slurm, but {why}")


def load_bench(config_path, overrides=None, need_cluster: bool = True) -> BenchConfig:
    cfg = load_config(BenchConfig, config_path, overrides)
    validate(cfg, str(config_path), need_cluster)
    return cfg


# ----------------------------------------------------------------------------- CLI

def run_bench(config_path, output, overrides: list[str] | None = None, dry_run: bool = False,
              wait: bool = False):
    """Check the config, plan every stage, then run them (or print them: dry_run).
    Returns the outcome (transfer.executors.Outcome)."""
    from transfer import executors
    from transfer.bench_plan import plan

    cfg = load_bench(config_path, overrides, need_cluster=not dry_run)
    out = Path(output).absolute()
    stages = plan(cfg, out)
    if dry_run:
        executors.dry_run(cfg, out, stages)
        return None
    from mocobench.fileio import prepare_output

    with prepare_output(out, "bench"):
        return executors.run(cfg, out, stages, wait=wait)


@cli
def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m transfer bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="bench YAML, e.g. configs/bench/demo.yaml")
    p.add_argument("--output", required=True, help="folder for every stage's outputs")
    p.add_argument("--dry-run", action="store_true",
                   help="print each stage's command and resources (and sbatch script); run nothing")
    p.add_argument("--wait", action="store_true",
                   help="executor slurm: wait until every stage and the report are done")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the bench config")
    args = p.parse_args(argv)
    outcome = run_bench(args.config, args.output, args.overrides, dry_run=args.dry_run, wait=args.wait)
    if outcome is not None:
        outcome.exit()


if __name__ == "__main__":
    main(sys.argv[1:])
