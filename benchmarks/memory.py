"""Peak memory of a training step, MoCo vs supervised, fp32 vs channels_last vs bf16
autocast; and the step time of channels_last and bf16 relative to fp32.

What the memory figure measures:
- GPU: torch.cuda.max_memory_allocated over two training steps (tensors only, the
  caching allocator's slack excluded), after the model, optimizer and inputs exist.
- CPU: torch has no peak counter for its CPU allocator, so each setting runs in a fresh
  process and reports the growth of the process's peak resident set (Linux VmHWM, reset
  after building the model, optimizer and inputs) over two training steps, above the
  resident set at that point. That is what the OS had to provide for the step: activations, gradients,
  SGD momentum buffers, plus malloc's own slack; it is an upper bound on the tensors.
"""
import json
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn

from benchmarks.timing import interleaved
from pretrain.builder import MoCo, build_encoder

SETTINGS = {"fp32": (False, False), "channels_last": (True, False), "bf16": (False, True)}


def make_step(method: str, setting: str, arch: str, batch: int, size: int, K: int, device):
    """A closure running one optimizer step of `method` with the options of `setting`,
    the way pretrain/train.py runs it (train.channels_last, train.amp=bf16)."""
    channels_last, bf16 = SETTINGS[setting]
    torch.manual_seed(0)
    if method == "moco":
        model = MoCo(arch, 128, K, 0.999, 0.2, mlp=True, bn_splits=8)
        params = model.encoder_q.parameters()
    else:
        model = build_encoder(arch, 10, mlp=False)
        params = model.parameters()
    model = model.to(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.SGD(params, 0.03, momentum=0.9, weight_decay=1e-4)
    im_q, im_k = (torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
                  for _ in range(2))
    labels = torch.randint(0, 10, (batch,), device=device)
    ce = nn.CrossEntropyLoss()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    def step():
        with autocast:
            logits, target = model(im_q, im_k) if method == "moco" else (model(im_q), labels)
            loss = ce(logits.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss

    return step


def _peak_child(method, setting, arch, batch, size, K) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step = make_step(method, setting, arch, batch, size, K, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(), step()
        return {"bytes": torch.cuda.max_memory_allocated() - base, "what": "CUDA max_memory_allocated"}
    # ru_maxrss survives exec (it would report the parent's peak); Linux's VmHWM belongs to
    # this process and writing 5 to clear_refs resets it to the current RSS.
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    step(), step()
    return {"bytes": (_status_kib("VmHWM") - base) * 1024, "what": "peak RSS growth"}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (the CPU memory figure needs Linux)")


def peak_memory(method, setting, arch, batch, size, K) -> dict:
    """Run `_peak_child` in a fresh process, so each setting starts from a clean heap."""
    args = json.dumps([method, setting, arch, batch, size, K])
    code = f"import json; from benchmarks.memory import _peak_child; print(json.dumps(_peak_child(*json.loads({args!r}))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(full: bool = False) -> list[dict]:
    arch, batch, size, K, repeats = (("resnet50", 64, 224, 65536, 10) if full
                                     else ("resnet18", 32, 64, 4096, 5))
    setting = f"{arch}, batch {batch}, {size} px"
    rows = []
    peaks = {}
    for method in ("moco", "supervised"):
        for name in SETTINGS:
            peaks[method, name] = peak_memory(method, name, arch, batch, size, K)
            rows.append({"name": f"peak memory of a step: {method}, {name}",
                         "value": peaks[method, name]["bytes"] / 2**20, "unit": "MiB",
                         "note": f"{peaks[method, name]['what']}; {setting}"})
    rows.append({"name": "peak memory: MoCo / supervised (fp32)", "value":
                 peaks["moco", "fp32"]["bytes"] / max(peaks["supervised", "fp32"]["bytes"], 1),
                 "unit": "ratio", "note": setting})

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = {name: make_step("moco", name, arch, batch, size, K, device) for name in SETTINGS}
    t = interleaved(steps, repeats=repeats)
    for name in ("channels_last", "bf16"):
        rows.append({"name": f"MoCo step time: {name} / fp32", "value": t[name] / t["fp32"],
                     "unit": "ratio", "note": f"<1: {name} wins; {setting}, {device.type}"})
    return rows
