"""Fashion-MNIST scenes: composition rules, and every layout read back by the real readers."""
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from helpers import NEEDS_DETECTRON2
from PIL import Image

from mocobench.data import fashion_mnist
from mocobench.errors import UserError
from transfer import scenes as sc

N_TRAIN, N_VAL = 6, 3


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    paths = sc.ensure_demo_scenes(root, N_TRAIN, N_VAL, seed=3)
    scenes = sc.compose_scenes(N_TRAIN + N_VAL, seed=3)
    return paths, scenes[:N_TRAIN], scenes[N_TRAIN:]


def test_compose_is_deterministic_and_seeded():
    a, b, c = (sc.compose_scenes(3, seed=s) for s in (0, 0, 1))
    for x, y in zip(a, b):
        assert np.array_equal(x.image, y.image) and np.array_equal(x.boxes, y.boxes)
        assert np.array_equal(x.masks, y.masks) and np.array_equal(x.items, y.items)
    assert not all(np.array_equal(x.image, z.image) for x, z in zip(a, c))


def test_items_come_from_the_test_split_with_their_labels_and_exact_boxes():
    scenes = sc.compose_scenes(12, seed=5, canvas=128, objects=(2, 4))
    _, labels = fashion_mnist("test")
    items = np.concatenate([s.items for s in scenes])
    assert len(set(items.tolist())) == len(items), "an item was used twice"
    for s in scenes:
        assert 1 <= len(s.labels) <= 4 and s.image.shape == (128, 128, 3) and s.image.dtype == np.uint8
        assert np.array_equal(s.labels, labels[s.items])
        for box, mask in zip(s.boxes, s.masks):
            ys, xs = np.nonzero(mask)
            assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        for i in range(len(s.boxes)):  # no two items touch: every mask fully visible
            for j in range(i + 1, len(s.boxes)):
                a, b = s.boxes[i], s.boxes[j]
                assert a[2] + sc.GAP <= b[0] or b[2] + sc.GAP <= a[0] or a[3] + sc.GAP <= b[1] or b[3] + sc.GAP <= a[1]
        lm = s.label_map()
        assert set(np.unique(lm)) <= set(range(11))
        for mask, label in zip(s.masks, s.labels):
            assert (lm[mask] == label + 1).all()


def test_polygons_rasterise_back_to_the_mask():
    import pycocotools.mask as mask_util

    s = sc.compose_scenes(2, seed=1)[1]
    for mask in s.masks:
        polys = sc.mask_to_polygons(mask)
        rle = mask_util.merge(mask_util.frPyObjects(polys, *mask.shape))
        assert np.array_equal(mask_util.decode(rle).astype(bool), mask)


def test_voc_layout_parses_as_xml(demo):
    paths, train, val = demo
    voc = paths["voc"]
    assert (voc / "classes.txt").read_text().split() == sc.CLASSES
    for split, scenes in (("train", train), ("val", val), ("test", val), ("trainval", train + val)):
        ids = (voc / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        assert ids == [s.name for s in scenes]
    for s in train + val:
        tree = ET.parse(voc / "Annotations" / f"{s.name}.xml")
        assert int(tree.findtext("size/width")) == 128 and tree.findtext("filename") == f"{s.name}.jpg"
        objs = tree.findall("object")
        assert [o.findtext("name") for o in objs] == [sc.CLASSES[c] for c in s.labels]
        got = [[int(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")] for o in objs]
        assert got == [[b[0] + 1, b[1] + 1, b[2], b[3]] for b in s.boxes.astype(int).tolist()]
        with Image.open(voc / "JPEGImages" / f"{s.name}.jpg") as im:
            assert im.size == (128, 128) and im.format == "JPEG"
            assert np.abs(np.asarray(im, np.int16) - s.image).mean() < 5  # JPEG quality 95, 4:4:4


@NEEDS_DETECTRON2
def test_voc_layout_parses_with_detectron2(demo):
    from detectron2.data.datasets.pascal_voc import load_voc_instances

    paths, train, _ = demo
    dicts = load_voc_instances(str(paths["voc"]), "train", sc.CLASSES)
    assert [d["image_id"] for d in dicts] == [s.name for s in train]
    for d, s in zip(dicts, train):
        assert [a["bbox"] for a in d["annotations"]] == s.boxes.tolist()
        assert [a["category_id"] for a in d["annotations"]] == s.labels.tolist()


def test_coco_layout_parses_with_pycocotools(demo):
    import contextlib
    import io

    from pycocotools.coco import COCO

    paths, _, val = demo
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(paths["coco"] / "annotations" / "instances_val.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == sc.CLASSES
    imgs = coco.loadImgs(sorted(coco.getImgIds()))
    assert [i["file_name"] for i in imgs] == [f"{s.name}.jpg" for s in val]
    for img, s in zip(imgs, val):
        assert (paths["coco"] / "val" / img["file_name"]).is_file()
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
        assert [a["category_id"] - 1 for a in anns] == s.labels.tolist()
        for a, box, mask in zip(anns, s.boxes, s.masks):
            x, y, w, h = a["bbox"]
            assert [x, y, x + w, y + h] == box.tolist()
            assert np.array_equal(coco.annToMask(a).astype(bool), mask) and a["area"] == mask.sum()


@NEEDS_DETECTRON2
def test_coco_layout_parses_with_detectron2(demo):
    from detectron2.data.datasets.coco import load_coco_json
    from detectron2.structures import polygons_to_bitmask

    paths, train, _ = demo
    dicts = load_coco_json(str(paths["coco"] / "annotations" / "instances_train.json"),
                           str(paths["coco"] / "train"), dataset_name=None)
    assert len(dicts) == len(train)
    for d, s in zip(dicts, train):
        assert os.path.basename(d["file_name"]) == f"{s.name}.jpg"
        for a, mask in zip(d["annotations"], s.masks):
            assert np.array_equal(polygons_to_bitmask(a["segmentation"], 128, 128), mask)


def test_mmseg_layout_is_exact(demo):
    paths, train, val = demo
    for split, scenes in (("train", train), ("val", val)):
        for s in scenes:
            img = np.asarray(Image.open(paths["mmseg"] / "img_dir" / split / f"{s.name}.png"))
            ann = np.asarray(Image.open(paths["mmseg"] / "ann_dir" / split / f"{s.name}.png"))
            assert np.array_equal(img, s.image) and ann.dtype == np.uint8
            assert np.array_equal(ann, s.label_map())


def test_ensure_is_idempotent_and_leaves_no_temp_folders(demo):
    paths, _, _ = demo
    stamp = os.stat(paths["voc"] / "ImageSets" / "Main" / "train.txt").st_mtime_ns
    again = sc.ensure_demo_scenes(paths["root"].parent, N_TRAIN, N_VAL, seed=3)
    assert again == paths
    assert os.stat(paths["voc"] / "ImageSets" / "Main" / "train.txt").st_mtime_ns == stamp
    assert [p.name for p in paths["root"].parent.iterdir()] == [paths["root"].name]


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(UserError, match="do not fit a 40-pixel canvas"):
        sc.compose_scenes(1, canvas=40)
    with pytest.raises(UserError, match="at least one train and one val"):
        sc.ensure_demo_scenes(tmp_path, 0, 1)
    (tmp_path / f"fmnist-scenes_v{sc.VERSION}_c128_n1-1_s0").mkdir()
    with pytest.raises(UserError, match="incomplete.*delete it"):
        sc.ensure_demo_scenes(tmp_path, 1, 1)


def test_scenes_with_fewer_larger_objects_on_a_flat_background(tmp_path):
    paths = sc.ensure_demo_scenes(tmp_path, 4, 2, seed=0, objects=(1, 2), scale=(1.5, 2.5), background="flat")
    assert paths["root"].name.endswith("_o1-2_x1.5-2.5_bgflat")
    scenes = sc.compose_scenes(6, seed=0, objects=(1, 2), scale=(1.5, 2.5), background="flat")
    default = sc.compose_scenes(6, seed=0)
    for s in scenes:
        assert 1 <= len(s.labels) <= 2
        background = s.image[~s.masks.any(0)].astype(float)
        assert background.std(0).max() < 8  # one grey plus mild noise: no gradient
    assert np.mean([(b[2] - b[0]) for s in scenes for b in s.boxes]) > \
        np.mean([(b[2] - b[0]) for s in default for b in s.boxes])
    with pytest.raises(UserError, match="background 'stripes' is not one of gradient, flat"):
        sc.compose_scenes(1, background="stripes")
