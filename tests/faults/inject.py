"""Run `python -m pretrain` with one fault injected, chosen by the FAULT variable:

    kill_rank:R:N        rank R SIGKILLs itself before its N-th optimizer step (first attempt only)
    kill_before_rename:N the N-th checkpoint write is killed between temp write and rename
    nan_loss:N           the N-th loss is NaN
    disk_free:BYTES      the disk reports only BYTES free
    enospc_save:N        the N-th checkpoint write fails with "No space left on device"
    kill_worker:N        a data loader worker SIGKILLs itself at its N-th image decode
    fill_disk_at_save:N  the N-th checkpoint write first fills its file system (a real full disk)
    wait_for_file:N:PATH before its N-th optimizer step the run waits until PATH exists

Faults are injected by patching library calls from outside, so the product code
has no test hooks.
"""
import errno
import os
import signal
import sys

import torch

kind, *args = os.environ["FAULT"].split(":")
calls = {"n": 0}


def nth(n: int) -> bool:
    calls["n"] += 1
    return calls["n"] == n


if kind == "kill_rank":
    rank, at = int(args[0]), int(args[1])
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    step = torch.optim.SGD.step

    def killing_step(self, *a, **k):
        if first_attempt and int(os.environ.get("RANK", "0")) == rank and nth(at):
            os.kill(os.getpid(), signal.SIGKILL)
        return step(self, *a, **k)

    torch.optim.SGD.step = killing_step
elif kind == "kill_before_rename":
    replace = os.replace

    def killing_replace(src, dst):
        if str(dst).endswith(".pth") and nth(int(args[0])):
            os.kill(os.getpid(), signal.SIGKILL)
        return replace(src, dst)

    os.replace = killing_replace
elif kind == "nan_loss":
    forward = torch.nn.CrossEntropyLoss.forward

    def nan_forward(self, *a, **k):
        loss = forward(self, *a, **k)
        return loss * float("nan") if nth(int(args[0])) else loss

    torch.nn.CrossEntropyLoss.forward = nan_forward
elif kind == "disk_free":
    import shutil

    usage = shutil.disk_usage
    shutil.disk_usage = lambda p: usage(p)._replace(free=int(args[0]))
elif kind == "enospc_save":
    save = torch.save

    def failing_save(obj, f, *a, **k):
        if nth(int(args[0])):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, f, *a, **k)

    torch.save = failing_save
elif kind == "kill_worker":
    from PIL import Image
    from torch.utils.data import get_worker_info

    convert = Image.Image.convert

    def killing_convert(self, *a, **k):
        if get_worker_info() is not None and nth(int(args[0])):
            os.kill(os.getpid(), signal.SIGKILL)
        return convert(self, *a, **k)

    Image.Image.convert = killing_convert
elif kind == "fill_disk_at_save":
    from pathlib import Path

    save = torch.save

    def filling_save(obj, f, *a, **k):
        if nth(int(args[0])):
            try:  # atomic_write's temporary folder sits in the output folder
                with open(Path(f).parents[1] / "filler", "wb") as filler:
                    while True:
                        filler.write(b"\0" * 65536)
                        filler.flush()
            except OSError:
                pass
        return save(obj, f, *a, **k)

    torch.save = filling_save
elif kind == "wait_for_file":
    import time

    at, path = int(args[0]), ":".join(args[1:])
    step = torch.optim.SGD.step

    def waiting_step(self, *a, **k):
        if nth(at):
            deadline = time.time() + 300
            while not os.path.exists(path) and time.time() < deadline:
                time.sleep(0.1)
        return step(self, *a, **k)

    torch.optim.SGD.step = waiting_step
else:
    sys.exit(f"unknown FAULT {kind}")

from pretrain.__main__ import main  # noqa: E402

main(sys.argv[1:])
