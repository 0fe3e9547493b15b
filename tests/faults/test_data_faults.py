"""Data faults on real pretraining runs: unreadable images are skipped and counted up to
data.max_unreadable, then stop the run in one line; a data loader worker that dies is
reported in one line naming the worker and its sample, not as a hang or a traceback."""
import re
from pathlib import Path

from PIL import Image

from helpers import one_line_error, run_pretrain, run_with_fault
from mocobench.data import fashion_mnist


def image_folder(root: Path, per_class: int = 20) -> Path:
    """An ImageNet-layout folder of real Fashion-MNIST PNGs plus two broken files: random
    bytes named .jpg, and a PNG cut in half."""
    images, labels = fashion_mnist("train")
    for cls in (0, 1):
        folder = root / "train" / f"class{cls}"
        folder.mkdir(parents=True)
        for i, x in enumerate(images[labels == cls][:per_class]):
            Image.fromarray(x).save(folder / f"{i:03d}.png")
    (root / "train/class0/zz_garbage.jpg").write_bytes(b"\x00not an image" * 50)
    whole = (root / "train/class1/000.png").read_bytes()
    (root / "train/class1/zz_truncated.png").write_bytes(whole[: len(whole) // 2])
    return root


def test_unreadable_images_are_skipped_counted_and_named(tmp_path):
    data = image_folder(tmp_path / "data")
    run = run_pretrain(tmp_path / "out", f"data.source={data}", "data.max_unreadable=2",
                       "data.num_workers=2")
    assert run.returncode == 0, run.stderr[-2000:]
    warnings = [line for line in run.stderr.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == 2, run.stderr  # each file once, although read in both epochs
    assert any("zz_garbage.jpg" in w for w in warnings) and any("zz_truncated.png" in w for w in warnings)
    assert (tmp_path / "out/checkpoint_last.pth").exists()


def test_more_unreadable_images_than_the_limit_stop_the_run_in_one_line(tmp_path):
    data = image_folder(tmp_path / "data")
    run = run_pretrain(tmp_path / "out", f"data.source={data}", "data.max_unreadable=0",
                       "data.num_workers=2")
    one_line_error(run, "more than the limit of 0 (data.max_unreadable)")
    assert "zz_" in run.stderr


def test_a_dead_loader_worker_is_one_line_naming_worker_and_sample(tmp_path):
    run = run_with_fault(tmp_path, "kill_worker:5", "data.num_workers=2")
    one_line_error(run, "while loading sample")
    assert re.search(r"data loader worker died \(.*\): worker \d \(pid \d+\)", run.stderr), run.stderr
