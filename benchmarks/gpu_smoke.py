"""The GPU smoke: what CI (2 CPU cores, gloo) cannot measure, in one command on one GPU.

    python -m benchmarks.gpu_smoke [--official-source PATH/moco/builder.py] [--output FILE.json]

In under 8 minutes on one GPU, no downloads (JPEGs are cut from the photos scikit-learn ships):
- the MoCo v2 ResNet-50 step at 224 px (K=65536, batch 128, one BN group as each GPU runs under
  shuffling BN): images/s and peak memory in fp32, fp32 + channels_last, bf16 + channels_last,
  fp16 + channels_last (with the grad scaler), the way pretrain/train.py steps;
- with --official-source, the official moco/builder.py's MoCo on the same GPU, batch and
  fp32 step, and our step's images/s over it;
- python -m pretrain end to end on the generated JPEGs with the colour half of the
  augmentation in the loader workers (PIL, the default) and on the device: images/s of the
  loop, the data pipeline included;
- whether the device colour half makes a host synchronisation (CUDA sync debug mode).
It writes FILE.json and prints one table. Without a GPU it refuses in one line;
`--device cpu --tiny` runs the same code at toy sizes to test the script itself: its
figures are labelled, and are not GPU measurements.
"""
import argparse
import importlib.util
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import sklearn
import torch
import torch.nn as nn
from PIL import Image
from tabulate import tabulate

from mocobench.errors import UserError, cli

ROOT = Path(__file__).resolve().parents[1]
SIZES = {  # arch, batch, image px, K, timed steps, JPEGs, pretrain steps, workers
    "gpu": dict(arch="resnet50", batch=128, size=224, K=65536, steps=20, jpegs=2048, loop_steps=40,
                workers=min(16, os.cpu_count() or 1)),
    "tiny": dict(arch="resnet18", batch=16, size=32, K=64, steps=2, jpegs=64, loop_steps=4, workers=1),
}
SETTINGS = {  # name: (autocast dtype, channels_last)
    "fp32": (None, False), "fp32 + channels_last": (None, True),
    "bf16 + channels_last": (torch.bfloat16, True), "fp16 + channels_last": (torch.float16, True),
}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(model, params, sizes, device, dtype=None, channels_last=False) -> dict:
    """images/s and peak memory of `model`'s training step (logits, labels = model(q, k))."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device).to(memory_format=fmt)
    b, s = sizes["batch"], sizes["size"]
    im_q, im_k = (torch.randn(b, 3, s, s, device=device).contiguous(memory_format=fmt) for _ in range(2))
    optimizer = torch.optim.SGD(params, 0.03, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    ce = nn.CrossEntropyLoss()

    def step():
        with autocast:
            logits, labels = model(im_q, im_k)
            loss = ce(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()

    for _ in range(3):  # warm-up: cuDNN autotuning, allocator
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tic = time.perf_counter()
    for _ in range(sizes["steps"]):
        step()
    _sync(device)
    seconds = time.perf_counter() - tic
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"images_per_s": b * sizes["steps"] / seconds, "peak_gib": peak}


def model_rows(sizes, device) -> list[dict]:
    from pretrain.builder import MoCo

    rows = []
    for name, (dtype, channels_last) in SETTINGS.items():
        if dtype == torch.float16 and device.type != "cuda":
            rows.append({"figure": f"ours, {name}", "value": None, "note": "fp16 needs CUDA"})
            continue
        torch.manual_seed(0)
        model = MoCo(sizes["arch"], 128, sizes["K"], 0.999, 0.2, mlp=True, bn_splits=1)
        r = time_steps(model, model.encoder_q.parameters(), sizes, device, dtype, channels_last)
        rows.append({"figure": f"ours, {name}", "value": r["images_per_s"], "unit": "img/s",
                     "peak_gib": r["peak_gib"]})
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def official_rows(source: Path, sizes, device, ours_fp32: float) -> list[dict]:
    """The official builder's fp32 step (it calls .cuda() and needs a process group: one rank)."""
    if device.type != "cuda":
        return [{"figure": "official builder, fp32", "value": None,
                 "note": "skipped: the official builder calls .cuda()"}]
    import torchvision

    spec = importlib.util.spec_from_file_location("official_moco_builder", source)
    official = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(official)
    torch.manual_seed(0)
    model = official.MoCo(getattr(torchvision.models, sizes["arch"]), 128, sizes["K"], 0.999, 0.2, mlp=True)
    r = time_steps(model, model.encoder_q.parameters(), sizes, device)
    return [{"figure": "official builder, fp32", "value": r["images_per_s"], "unit": "img/s",
             "peak_gib": r["peak_gib"]},
            {"figure": "ours / official, fp32 images/s", "value": ours_fp32 / r["images_per_s"],
             "unit": "ratio", "note": ">1: ours is faster"}]


def make_jpegs(folder: Path, n: int, size: int) -> Path:
    """An ImageNet-layout folder of `n` JPEGs cut from scikit-learn's two photos, at sizes
    around ImageNet's (or around `size` for the tiny run)."""
    photos = [Image.open(p).convert("RGB")
              for p in sorted((Path(sklearn.__file__).parent / "datasets/images").glob("*.jpg"))]
    rng = random.Random(0)
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = (rng.randint(300, 500), rng.randint(250, 400)) if size >= 128 else (size + 16, size + 16)
        x, y = rng.randint(0, photo.width - min(w, photo.width)), rng.randint(0, photo.height - min(h, photo.height))
        crop = photo.crop((x, y, x + w, y + h)).resize((w, h))
        out = folder / "train" / f"c{i % 2}" / f"{i:05d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        crop.save(out, quality=90)
    return folder


def steady_rate(log: Path, batch: int) -> float:
    """images/s between the first and the last logged step (log.jsonl's rates are cumulative
    from the epoch's start, so the loader's start-up is taken out)."""
    records = [json.loads(line) for line in log.read_text().splitlines() if "images_per_sec" in line]
    first, last = records[0], records[-1]
    t_first, t_last = first["step"] * batch / first["images_per_sec"], last["step"] * batch / last["images_per_sec"]
    return (last["step"] - first["step"]) * batch / (t_last - t_first)


def loop_rows(sizes, device, work: Path) -> list[dict]:
    data = make_jpegs(work / "jpegs", sizes["jpegs"], sizes["size"])
    amp = ["train.amp=bf16", "train.channels_last=true"] if device.type == "cuda" else []
    rows = []
    for colour_on in ("worker", "device"):
        out = work / f"pretrain-{colour_on}"
        cmd = [sys.executable, "-m", "pretrain", "--config", str(ROOT / "configs/pretrain/moco_v2_r50_in1k.yaml"),
               "--output", str(out), f"data.source={data}", f"data.colour_on={colour_on}",
               f"model.arch={sizes['arch']}", f"data.image_size={sizes['size']}",
               f"train.batch_size={sizes['batch']}", f"moco.queue_size={sizes['K']}",
               f"data.num_workers={sizes['workers']}", f"train.max_steps={sizes['loop_steps']}",
               "train.print_freq=2", "train.save_every_epochs=0", "train.save_every_steps=0", *amp]
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        if device.type != "cuda":
            env["CUDA_VISIBLE_DEVICES"] = ""
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if result.returncode != 0:
            raise UserError(f"python -m pretrain with data.colour_on={colour_on} failed: "
                            f"{(result.stderr.strip().splitlines() or ['no output'])[-1]}")
        rows.append({"figure": f"pretrain loop, colour on the {colour_on}", "unit": "img/s",
                     "value": steady_rate(out / "log.jsonl", sizes["batch"]),
                     "note": f"{sizes['workers']} workers, {' '.join(amp) or 'fp32'}"})
    rows.append({"figure": "pretrain loop, colour on the device / worker", "unit": "ratio",
                 "value": rows[1]["value"] / rows[0]["value"], "note": ">1: the device half wins"})
    return rows


def sync_row(device) -> dict:
    """The device colour half under CUDA's sync debug mode: does it wait for the GPU?"""
    from pretrain.device_augment import WorkerHalf, colour_batch

    if device.type != "cuda":
        return {"figure": "host syncs in the device colour half", "value": None,
                "note": "CUDA only (the CPU proxy is tests/test_device_augment.py)"}
    torch.manual_seed(0)
    half = WorkerHalf("v2", 224)
    params = torch.stack([half.recipe.draw() for _ in range(128)])
    views = torch.randint(0, 256, (128, 3, 224, 224), dtype=torch.uint8, device=device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        colour_batch(views, params, half.recipe, [0.5] * 3, [0.25] * 3)
        note = "none"
    except RuntimeError as e:
        note = f"synchronises: {str(e).splitlines()[0][:120]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return {"figure": "host syncs in the device colour half", "value": None, "note": note}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_smoke", description=__doc__.split("\n\n")[0])
    p.add_argument("--official-source", type=Path, default=None,
                   help="the official facebookresearch/moco moco/builder.py, to time its step too")
    p.add_argument("--output", type=Path, default=Path("runs/gpu_smoke.json"))
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="toy sizes (with --device cpu: tests the script)")
    return p


@cli
def main(argv=None) -> dict:
    args = parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("benchmarks.gpu_smoke needs a CUDA GPU (torch.cuda.is_available() is False); "
                        "run it on a GPU node, or pass --device cpu --tiny to test the script itself")
    if args.official_source is not None and not args.official_source.is_file():
        raise UserError(f"--official-source {args.official_source} is not a file; pass the official "
                        "moco/builder.py (github.com/facebookresearch/moco)")
    device = torch.device(args.device)
    sizes = SIZES["tiny" if args.tiny else "gpu"]
    label = ("a GPU measurement" if device.type == "cuda" and not args.tiny
             else "NOT a GPU measurement: a smoke test of this script at toy sizes")
    torch.backends.cudnn.benchmark = True
    tic = time.perf_counter()
    if device.type == "cuda":
        _one_rank_group()
    rows = model_rows(sizes, device)
    if args.official_source is not None:
        rows += official_rows(args.official_source, sizes, device, rows[0]["value"])
    rows.append(sync_row(device))
    with tempfile.TemporaryDirectory() as work:
        rows += loop_rows(sizes, device, Path(work))
    report = {"what": label, "device": torch.cuda.get_device_name() if device.type == "cuda" else
              platform.processor() or platform.machine(), "torch": torch.__version__, "sizes": sizes,
              "seconds": round(time.perf_counter() - tic, 1), "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"gpu_smoke on {report['device']}: {label}")
    print(tabulate([[r["figure"], "-" if r["value"] is None else f"{r['value']:.3g}", r.get("unit", ""),
                     "" if r.get("peak_gib") is None else f"{r['peak_gib']:.1f}", r.get("note", "")]
                    for r in rows], headers=["figure", "value", "unit", "peak GiB", "note"], tablefmt="github"))
    print(f"written {args.output} ({report['seconds']} s)")
    return report


def _one_rank_group() -> None:
    """The official builder gathers and broadcasts even on one GPU: a one-rank group."""
    import socket

    import torch.distributed as torch_dist

    from mocobench.dist import backend_for

    if not torch_dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch_dist.init_process_group(backend_for("cuda"), init_method=f"tcp://127.0.0.1:{port}",
                                      rank=0, world_size=1)


if __name__ == "__main__":
    main()
