"""Fast vs paper linear protocol, side by side on the same weights and data.

    python -m benchmarks.linear_protocols --weights runs/pretrain_demo/checkpoint_last.pth \\
        --output runs/bench_linear [--config configs/linear/fashion_mnist_demo.yaml] [key=value ...]

Runs, in one process and with the same config and overrides (so the same data
subsets, image size and preprocessing):
  1. fast protocol from a cold feature cache (extraction included in its time),
  2. fast protocol again (warm cache: what a second evaluation costs),
  3. kNN on the cached features,
  4. the paper protocol (main_lincls recipe; epochs as the config says),
  5. a diagnostic: the paper's SGD (its lr, momentum, schedule, epochs, batch) on the
     cached eval-view features. Near the fast protocol, it says that a gap between fast
     and paper comes from the paper's training views (random crops + flips, scored on
     center crops), not from its optimiser.
Prints a table and writes OUTPUT/linear_protocols.json; each run also leaves its
results.json under OUTPUT/<run>/. Goal: the cold fast run at least 20x cheaper
than the paper protocol, top-1 within 1 point.
"""
import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch
from tabulate import tabulate

from mocobench.config import load_config
from mocobench.errors import cli
from mocobench.fileio import atomic_json
from transfer import linear
from transfer.linear import LinearConfig
from transfer.linear_paper import lr_at

DEFAULT_CONFIG = "configs/linear/fashion_mnist_demo.yaml"
GOAL_SPEEDUP, GOAL_TOP1_GAP = 20.0, 1.0


def _load() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def paper_sgd_on_features(cache: Path, cfg: LinearConfig) -> dict:
    """main_lincls's optimiser and schedule on the cached features of the eval view."""
    stored = {d["description"]["split"]: d for d in
              (torch.load(f, weights_only=False) for f in sorted(cache.glob("*.pt")))}
    # As the paper protocol: fit on train + val, score test.
    xtr = torch.cat([stored[s]["features"].float() for s in ("train", "val")])
    ytr = torch.cat([stored[s]["labels"] for s in ("train", "val")])
    xte, yte = stored["test"]["features"].float(), stored["test"]["labels"]
    p = cfg.paper
    torch.manual_seed(cfg.seed)
    fc = torch.nn.Linear(xtr.shape[1], int(ytr.max()) + 1)
    fc.weight.data.normal_(0.0, 0.01)
    fc.bias.data.zero_()
    lr = p.lr * p.batch_size / 256
    optimizer = torch.optim.SGD(fc.parameters(), lr, momentum=p.momentum, weight_decay=p.weight_decay)
    t0, c0 = time.time(), time.process_time()
    for epoch in range(p.epochs):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(lr, epoch, p.lr_steps)
        for batch in torch.randperm(len(xtr)).split(p.batch_size):
            loss = torch.nn.functional.cross_entropy(fc(xtr[batch]), ytr[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        top1 = 100.0 * (fc(xte).argmax(1) == yte).float().mean().item()
    return {"metrics": {"top1": top1}, "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0,
            "path": "-"}


def compare(weights: str, output, config: str | None, overrides: list[str], arch: str | None = None,
            label: str | None = None) -> dict:
    output = Path(output)
    cache = output / "feature_cache"
    shutil.rmtree(cache, ignore_errors=True)  # the fast protocol pays for its extraction
    base = list(overrides) + [f"features.cache_dir={cache}"] + ([f"model.arch={arch}"] if arch else [])

    def once(name, task, protocol):
        cfg = load_config(LinearConfig, config, base + [f"protocol={protocol}"])
        t0, c0 = time.time(), time.process_time()
        out = linear.run(task, cfg, weights, output / name, label)
        # CPU seconds next to wall seconds: other jobs on a shared machine inflate the latter.
        out["wall_s"], out["cpu_s"] = time.time() - t0, time.process_time() - c0
        return out

    load_before = _load()
    runs = {
        "fast (cold cache)": once("fast", "linear", "fast"),
        "fast (warm cache)": once("fast_warm", "linear", "fast"),
        "knn": once("knn", "knn", "fast"),
        "paper": once("paper", "linear", "paper"),
    }
    runs["paper SGD on eval-view features"] = paper_sgd_on_features(
        cache, load_config(LinearConfig, config, base + ["protocol=paper"]))
    paper = runs["paper"]
    rows = []
    for name, r in runs.items():
        m = r["metrics"]
        top1 = m.get("top1", m.get("knn_top1"))
        rows.append({"run": name, "top1": top1, "top5": m.get("top5", m.get("knn_top5")),
                     "wall_s": round(r["wall_s"], 2), "cpu_s": round(r["cpu_s"], 2),
                     "paper_time_over_this": round(paper["wall_s"] / r["wall_s"], 2),
                     "paper_cpu_over_this": round(paper["cpu_s"] / max(r["cpu_s"], 1e-9), 2),
                     "top1_minus_paper": round(top1 - paper["metrics"]["top1"], 2),
                     "results": str(r["path"])})
    fast, diagnostic = rows[0], rows[-1]
    record = json.loads(Path(paper["path"]).read_text())
    summary = {
        "weights": record["weights"], "dataset": record["dataset"],
        "scale": {k: record["config"]["data"][k] for k in
                  ("max_train_images", "max_val_images", "max_test_images", "image_size",
                   "resize_size")},
        "paper_epochs": record["config"]["paper"]["epochs"],
        "rows": rows,
        "speedup_fast_cold": fast["paper_time_over_this"],
        "top1_gap_fast_cold": fast["top1_minus_paper"],
        "top1_paper_sgd_on_eval_features": diagnostic["top1"],
        "goal": {"speedup_at_least": GOAL_SPEEDUP, "top1_gap_at_most": GOAL_TOP1_GAP,
                 "speedup_met": fast["paper_time_over_this"] >= GOAL_SPEEDUP,
                 "top1_met": abs(fast["top1_minus_paper"]) <= GOAL_TOP1_GAP},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.is_available(), "platform": platform.platform(),
                    "loadavg_before": load_before, "loadavg_after": _load()},
        "overrides": list(overrides), "config": config,
    }
    atomic_json(summary, output / "linear_protocols.json")
    return summary


def print_table(summary: dict) -> None:
    rows = [[r["run"], f"{r['top1']:.2f}", f"{r['top5']:.2f}" if r["top5"] is not None else "-",
             f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['paper_time_over_this']:.1f}x",
             f"{r['paper_cpu_over_this']:.1f}x", f"{r['top1_minus_paper']:+.2f}"]
            for r in summary["rows"]]
    print(tabulate(rows, headers=["run", "top-1", "top-5", "wall s", "CPU s", "paper wall / this",
                                  "paper CPU / this", "top-1 - paper"]))
    s, g = summary["scale"], summary["goal"]
    print(f"\n{summary['weights']['label']} on {summary['dataset']['name']}: "
          f"{s['max_train_images'] or 'all'} train / {s['max_val_images'] or 'all'} val images at "
          f"{s['image_size']} px, paper protocol {summary['paper_epochs']} epochs; "
          f"load average {summary['machine']['loadavg_before']} -> {summary['machine']['loadavg_after']}")
    print(f"goal: fast (cold) >= {g['speedup_at_least']:g}x cheaper: "
          f"{'met' if g['speedup_met'] else 'NOT met'} ({summary['speedup_fast_cold']:.1f}x); "
          f"top-1 within {g['top1_gap_at_most']:g} point: {'met' if g['top1_met'] else 'NOT met'} "
          f"({summary['top1_gap_fast_cold']:+.2f})")


def _demo_weights(output: Path, max_steps: int) -> str:
    """A MoCo v2 demo checkpoint from the project's own pretrain (reused when present)."""
    ckpt = output / "pretrain" / "checkpoint_last.pth"
    if not ckpt.is_file():
        from pretrain.config import PretrainConfig
        from pretrain.train import train

        cfg = load_config(PretrainConfig, "configs/pretrain/moco_v2_fmnist_demo.yaml",
                          [f"train.max_steps={max_steps}"])
        train(cfg, output / "pretrain")
    return str(ckpt)


def run(full: bool = False) -> list[dict]:
    """For `python -m benchmarks`: weights from $LINEAR_BENCH_WEIGHTS, else a short MoCo v2
    demo pretrain; small = 4000 train / 2000 val images, full = the demo config (10000 / 2000)."""
    output = Path("runs/bench_linear_protocols")
    weights = os.environ.get("LINEAR_BENCH_WEIGHTS") or _demo_weights(output, 0 if full else 200)
    overrides = [] if full else ["data.max_train_images=4000", "data.max_val_images=2000"]
    s = compare(weights, output, DEFAULT_CONFIG, overrides)
    fast = s["rows"][0]
    setting = (f"{s['weights']['label']}, {s['scale']['max_train_images']}/"
               f"{s['scale']['max_val_images']} images, {s['scale']['image_size']} px, "
               f"paper {s['paper_epochs']} ep")
    return [
        {"name": "paper time / fast time (cold cache)", "value": s["speedup_fast_cold"],
         "unit": "ratio", "note": f"goal >= {GOAL_SPEEDUP:g}; {setting}"},
        {"name": "fast top-1 - paper top-1", "value": s["top1_gap_fast_cold"], "unit": "points",
         "note": f"goal within {GOAL_TOP1_GAP:g}; fast {fast['top1']:.2f}"},
        {"name": "paper SGD on eval-view features - paper top-1",
         "value": s["top1_paper_sgd_on_eval_features"] - s["rows"][3]["top1"], "unit": "points",
         "note": "diagnostic: the part of the gap due to the paper's training views"},
        {"name": "paper time / fast time (warm cache)", "value": s["rows"][1]["paper_time_over_this"],
         "unit": "ratio", "note": "second evaluation of the same weights"},
    ]


@cli
def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.linear_protocols", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="checkpoint, or 'random' with --arch")
    p.add_argument("--arch", help="model.arch (needed with --weights random)")
    p.add_argument("--label", help="human label of the weights")
    p.add_argument("--output", default="runs/bench_linear_protocols")
    p.add_argument("--config", default=DEFAULT_CONFIG, help=f"default {DEFAULT_CONFIG}")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="applied to every run, e.g. data.max_train_images=5000 paper.epochs=20")
    args = p.parse_args(argv)
    summary = compare(args.weights, args.output, args.config, args.overrides, args.arch, args.label)
    print_table(summary)
    print(f"-> {Path(args.output) / 'linear_protocols.json'}")
    return summary


if __name__ == "__main__":
    main()
