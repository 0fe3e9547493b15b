"""A user's own segmentation data set on disk, in the layout docs/segmentation.md describes, and a
config for it built on the demo config: shared by test_segment.py and test_one_line_errors.py."""
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "segmentation" / "demo_fcn_r18_d16_scenes.py"
CLASSES = ("background", "square", "disc")


def scene(rng, size=(40, 48)):
    """(H x W x 3 uint8 image, H x W uint8 labels): a square (1) and a disc (2) on a dim
    background (0), with a ring of ignore (255) around the disc, like VOC's object borders."""
    h, w = size
    image = rng.integers(0, 60, (h, w, 3)).astype(np.uint8)
    label = np.zeros((h, w), np.uint8)
    y, x = rng.integers(2, h // 2 - 4), rng.integers(2, w // 2 - 4)
    label[y:y + 10, x:x + 10] = 1
    yy, xx = np.mgrid[:h, :w]
    r = np.hypot(yy - (h * 3 // 4), xx - (w * 3 // 4))
    label[r < 7] = 2
    label[(r >= 7) & (r < 8)] = 255
    image[label == 1] = (220, 60, 60)
    image[label == 2] = (60, 220, 60)
    return image, label


def write_dataset(root, n_train=4, n_test=2, size=(40, 48), classes=CLASSES, seed=0) -> Path:
    """root/img_dir/{train,val}/*.png, root/ann_dir/{train,val}/*.png, root/classes.txt."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_test)):
        (root / "img_dir" / split).mkdir(parents=True, exist_ok=True)
        (root / "ann_dir" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            image, label = scene(rng, size)
            Image.fromarray(image).save(root / "img_dir" / split / f"{split}_{i}.png")
            Image.fromarray(label).save(root / "ann_dir" / split / f"{split}_{i}.png")
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def child_config(path, *lines) -> Path:
    """A config built on the demo config, as a user would write one: `_base_` plus `lines`. The
    demo's class weights are one per scene class; a data set with other classes sets its own."""
    path = Path(path)
    unweighted = "model = dict(decode_head=dict(loss_decode=dict(class_weight=None)))"
    path.write_text("\n".join([f"_base_ = [{str(DEMO)!r}]", unweighted, *lines]) + "\n")
    return path


TINY = ["train_cfg.max_iters=2", "train_dataloader.batch_size=2"]
