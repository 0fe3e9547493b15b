"""Registered data sets read through torchvision from tiny fixtures in each data set's real
on-disk format (written here, as torchvision's own tests do; md5 checks patched where
torchvision insists on them), the carved validation splits, ImageNet-layout folders,
16-bit images and class folders without images."""
import json
import pickle

import numpy as np
import pytest
import scipy.io
from PIL import Image

from mocobench.data import build_dataset, carve
from mocobench.datasets import REGISTRY, evaluation_splits
from mocobench.errors import UserError


def jpg(path, seed=0, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _cifar(root, folder, train_name, test_name, meta_name, label_key, names_key, classes):
    base = root / folder
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [*[(f, 10) for f in train_name], (test_name, 8)]:
        batch = {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                 label_key: [i % classes for i in range(n)]}
        (base / name).write_bytes(pickle.dumps(batch))
    (base / meta_name).write_bytes(pickle.dumps({names_key: [f"c{i}" for i in range(classes)]}))


def write_cifar10(root):
    _cifar(root, "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
           "batches.meta", "labels", "label_names", 10)


def write_cifar100(root):
    _cifar(root, "cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names", 100)


def write_stl10(root):
    base = root / "stl10_binary"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in [("train", 20), ("test", 10), ("unlabeled", 0)]:
        rng.integers(0, 255, (n, 3, 96, 96), dtype=np.uint8).tofile(base / f"{split}_X.bin")
        if split != "unlabeled":
            (np.arange(n) % 10 + 1).astype(np.uint8).tofile(base / f"{split}_y.bin")  # 1-based
    (base / "class_names.txt").write_text("\n".join(f"c{i}" for i in range(10)))


def write_dtd(root):
    base = root / "dtd" / "dtd"
    for split, n in [("train", 4), ("val", 2), ("test", 3)]:
        lines = []
        for cls in ("banded", "bubbly"):
            for i in range(n):
                name = f"{cls}_{split}{i}.jpg"
                jpg(base / "images" / cls / name, i)
                lines.append(f"{cls}/{name}")
        (base / "labels").mkdir(parents=True, exist_ok=True)
        (base / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")


def write_flowers102(root):
    base = root / "flowers-102"
    labels = np.array([1, 2, 3] * 6)  # 18 images, 1-based classes
    for i in range(1, 19):
        jpg(base / "jpg" / f"image_{i:05d}.jpg", i)
    scipy.io.savemat(base / "imagelabels.mat", {"labels": labels})
    scipy.io.savemat(base / "setid.mat", {"trnid": np.arange(1, 7), "valid": np.arange(7, 13),
                                          "tstid": np.arange(13, 19)})


def write_pets(root):
    base = root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    for split, ids in [("trainval", range(1, 6)), ("test", range(6, 9))]:
        lines = []
        for breed, label, species in [("Abyssinian", 1, 1), ("american_bulldog", 2, 2)]:
            for i in ids:
                jpg(base / "images" / f"{breed}_{i}.jpg", i)
                lines.append(f"{breed}_{i} {label} {species} 1")
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")


def write_aircraft(root):
    base = root / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "A300B4", "Cessna 172"]
    (base / "images").mkdir(parents=True)
    (base / "variants.txt").write_text("\n".join(variants) + "\n")
    n = 0
    for split, per in [("train", 2), ("val", 1), ("test", 2)]:
        lines = []
        for v in variants:
            for _ in range(per):
                n += 1
                jpg(base / "images" / f"{1000000 + n}.jpg", n)
                lines.append(f"{1000000 + n} {v}")
        (base / f"images_variant_{split}.txt").write_text("\n".join(lines) + "\n")


def write_cars(root):
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    scipy.io.savemat(base / "devkit" / "cars_meta.mat",
                     {"class_names": np.array(["AM General Hummer", "Acura RL", "Audi A5"], dtype=object)})
    for split, n, annos in [("train", 9, base / "devkit" / "cars_train_annos.mat"),
                            ("test", 6, base / "cars_test_annos_withlabels.mat")]:
        rec = np.array([(f"{i:05d}.jpg", i % 3 + 1) for i in range(n)],
                       dtype=[("fname", "O"), ("class", "O")])
        scipy.io.savemat(annos, {"annotations": rec})
        for i in range(n):
            jpg(base / f"cars_{split}" / f"{i:05d}.jpg", i)


def write_food101(root):
    base = root / "food-101"
    (base / "meta").mkdir(parents=True)
    for split, ids in [("train", range(5)), ("test", range(5, 8))]:
        meta = {cls: [f"{cls}/{i}" for i in ids] for cls in ("apple_pie", "sushi")}
        for names in meta.values():
            for name in names:
                jpg(base / "images" / f"{name}.jpg", len(name))
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))


def write_sun397(root):
    base = root / "SUN397"
    classes = ["/a/abbey", "/b/bedroom", "/b/butte"]
    base.mkdir(parents=True)
    (base / "ClassName.txt").write_text("\n".join(classes) + "\n")
    train, test = [], []
    for c in classes:
        for i in range(6):
            name = f"{c}/sun_{c.split('/')[-1]}{i}.jpg"
            jpg(base / name.lstrip("/"), i)
            (train if i < 4 else test).append(name)
    (base / "Partitions").mkdir()
    (base / "Partitions" / "Training_01.txt").write_text("\n".join(train) + "\n")
    (base / "Partitions" / "Testing_01.txt").write_text("\n".join(test) + "\n")


def write_caltech101(root):
    base = root / "caltech101" / "101_ObjectCategories"
    for cat, n in [("accordion", 33), ("airplanes", 35), ("ant", 31), ("BACKGROUND_Google", 4)]:
        for i in range(1, n + 1):
            jpg(base / cat / f"image_{i:04d}.jpg", i)


def write_voc2007(root):
    base = root / "VOCdevkit" / "VOC2007"
    (base / "Annotations").mkdir(parents=True)
    (base / "ImageSets" / "Main").mkdir(parents=True)
    objects = [("dog", "0"), ("person", "0"), ("cat", "1"), ("dog", "1")]  # cycled per image
    ids = {"train": range(1, 7), "val": range(7, 10), "test": range(10, 15)}
    for split, numbers in ids.items():
        names = [f"{i:06d}" for i in numbers]
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(names) + "\n")
        for i, name in zip(numbers, names):
            jpg(base / "JPEGImages" / f"{name}.jpg", i)
            objs = [objects[i % 4], objects[(i + 1) % 4]]
            if i == 3:  # one image's only <difficult/> is empty, as some annotation tools write it
                objs = [("cat", "")]
            xml = "".join(f"<object><name>{n}</name><difficult>{d}</difficult>"
                          "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox>"
                          "</object>" for n, d in objs)
            (base / "Annotations" / f"{name}.xml").write_text(
                f"<annotation><filename>{name}.jpg</filename>{xml}</annotation>")


# name -> (writer, md5-checking torchvision modules to patch, {split: images}, classes)
FIXTURES = {
    "cifar10": (write_cifar10, ["cifar"], {"train": 40, "val": 10, "test": 8}, 10),
    "cifar100": (write_cifar100, ["cifar"], {"train": 10, "val": 0, "test": 8}, 100),
    "stl10": (write_stl10, ["stl10"], {"train": 10, "val": 10, "test": 10}, 10),
    "dtd": (write_dtd, [], {"train": 8, "val": 4, "test": 6}, 2),
    "flowers102": (write_flowers102, ["flowers102"], {"train": 6, "val": 6, "test": 6}, 102),
    "pets": (write_pets, [], {"train": 8, "val": 2, "test": 6}, 2),
    "aircraft": (write_aircraft, [], {"train": 6, "val": 3, "test": 6}, 3),
    "cars": (write_cars, [], {"train": 6, "val": 3, "test": 6}, 3),
    "food101": (write_food101, [], {"train": 8, "val": 2, "test": 6}, 2),
    "sun397": (write_sun397, [], {"train": 9, "val": 3, "test": 6}, 3),
    "caltech101": (write_caltech101, [], {"train": 72, "val": 18, "test": 9}, 3),
    "voc2007": (write_voc2007, [], {"train": 6, "val": 3, "test": 5}, 20),
}


def test_every_registered_data_set_has_a_fixture():
    assert set(REGISTRY) - {"fashion-mnist"} == set(FIXTURES)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_read_through_torchvision_in_its_on_disk_format(name, tmp_path, monkeypatch):
    write, md5_modules, sizes, num_classes = FIXTURES[name]
    write(tmp_path)
    import importlib

    for module in md5_modules:  # the fixtures' md5s are not the published files'
        monkeypatch.setattr(importlib.import_module(f"torchvision.datasets.{module}"),
                            "check_integrity", lambda *a, **k: True)
    if name == "cifar100":  # 10 images of 100 classes: one each, nothing to carve
        with pytest.raises(UserError, match="too few training images to carve"):
            build_dataset(name, "val", root=tmp_path)
        return
    got = {s: build_dataset(name, s, root=tmp_path) for s in sizes}
    assert {s: len(ds) for s, ds in got.items()} == sizes
    assert all(len(ds.classes) == num_classes for ds in got.values())
    image, label, index = got["test"][0]
    assert image.mode == "RGB" and index == 0
    train_ids, val_ids = set(got["train"].ids()), set(got["val"].ids())
    assert not train_ids & val_ids, "validation images must not be training images"
    assert not (train_ids | val_ids) & set(got["test"].ids())
    if name == "voc2007":
        assert np.asarray(label).shape == (20,) and got["train"].multilabel
        labels = np.asarray(got["train"].targets)
        assert set(np.unique(labels)) == {-1, 0, 1}  # present, absent, only difficult
    else:
        assert 0 <= label < num_classes


def test_voc_empty_difficult_counts_as_not_difficult(tmp_path):
    write_voc2007(tmp_path)
    train = build_dataset("voc2007", "train", root=tmp_path)
    third = dict(zip(train.ids(), train.targets))["000003"]  # one cat, <difficult/> empty
    assert third[7] == 1 and sum(third) == 1


def test_caltech101_draws_30_train_images_per_class(tmp_path):
    write_caltech101(tmp_path)
    parts = evaluation_splits("caltech101", root=tmp_path)
    train_val = np.bincount(np.r_[parts["train"].targets, parts["val"].targets])
    assert train_val.tolist() == [30, 30, 30] and len(parts["test"]) == 3 + 5 + 1
    assert "BACKGROUND_Google" not in parts["train"].classes


def test_a_missing_data_set_says_where_and_how_to_get_it(tmp_path):
    with pytest.raises(UserError, match=rf"cifar10 train split cannot be read from "
                                        rf"{tmp_path}/cifar-10-batches-py .*MOCO_BENCH_DATA.*--download"):
        build_dataset("cifar10", "train", root=tmp_path)
    with pytest.raises(UserError, match="SUN397.*Partitions/Training_01.txt"):
        (tmp_path / "SUN397").mkdir()
        (tmp_path / "SUN397" / "ClassName.txt").write_text("/a/abbey\n")
        build_dataset("sun397", "train", root=tmp_path)


def test_the_data_root_comes_from_the_environment(tmp_path, monkeypatch):
    write_dtd(tmp_path)
    monkeypatch.setenv("MOCO_BENCH_DATA", str(tmp_path))
    assert len(build_dataset("dtd", "test")) == 6


def test_fashion_mnist_val_is_carved_from_train_per_class_and_seeded():
    train, val, test = (build_dataset("fashion-mnist", s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (48000, 12000, 10000)
    assert np.bincount(val.targets).tolist() == [1200] * 10
    assert not set(train.ids()) & set(val.ids())
    assert set(train.ids()) | set(val.ids()) == {f"train/{i}" for i in range(60000)}
    assert val.split_info["seed"] == 0 and val.split_info["fraction"] == 0.2
    again = build_dataset("fashion-mnist", "val")
    other = build_dataset("fashion-mnist", "val", split_seed=1)
    assert again.ids() == val.ids() and other.ids() != val.ids()


def test_carve_keeps_every_class_on_both_sides():
    labels = np.r_[np.zeros(50), np.ones(3), np.full(2, 2)]
    kept, carved = carve(labels, 0.2, seed=0)
    assert sorted(np.r_[kept, carved].tolist()) == list(range(len(labels)))
    assert np.bincount(labels[carved].astype(int)).tolist() == [10, 1, 1]
    assert set(labels[kept]) == {0, 1, 2}


def _folder(root, splits=("train", "val"), classes=("a", "b"), n=10):
    for split in splits:
        for c in classes:
            for i in range(n):
                jpg(root / split / c / f"{i}.png", i)
    return root


def test_imagenet_layout_without_test_scores_val_and_carves_its_validation_split(tmp_path):
    parts = evaluation_splits(str(_folder(tmp_path)), val_fraction=0.2)
    assert {s: len(ds) for s, ds in parts.items()} == {"train": 16, "val": 4, "test": 20}
    assert all(i.startswith(("a/", "b/")) for i in parts["test"].ids())
    assert "val/" in parts["test"].split_info["from"] and parts["val"].split_info["part"] == "carved"
    with_test = evaluation_splits(str(_folder(tmp_path / "t", ("train", "val", "test"))))
    assert {s: len(ds) for s, ds in with_test.items()} == {"train": 20, "val": 20, "test": 20}
    scored_on_val = evaluation_splits(str(_folder(tmp_path)), score_split="val")
    assert len(scored_on_val["test"]) == 4 and len(scored_on_val["train"]) + len(scored_on_val["val"]) == 16


def test_a_class_folder_without_images_is_refused(tmp_path):
    _folder(tmp_path)
    (tmp_path / "train" / "c_empty").mkdir()
    (tmp_path / "train" / "c_empty" / "notes.txt").write_text("no images here")
    with pytest.raises(UserError, match=r"class folder\(s\) without images: c_empty; add images or "
                                        "remove the folder"):
        build_dataset(str(tmp_path), "train")


def test_16_bit_images_are_read_by_their_high_byte_not_clipped_white(tmp_path):
    ramp = (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64)  # 0 .. 65472
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        Image.fromarray(ramp).save(tmp_path / "train" / c / "x.png")  # a real 16-bit PNG
        Image.fromarray(ramp).save(tmp_path / "train" / c / "x.tif")  # and TIFF
    assert Image.open(tmp_path / "train" / "a" / "x.png").mode == "I;16"
    ds = build_dataset(str(tmp_path), "train")
    for i in range(len(ds)):
        pixels = np.asarray(ds[i][0])
        assert pixels.shape == (32, 32, 3) and (pixels[..., 0] == pixels[..., 2]).all()
        assert np.array_equal(pixels[..., 0], (ramp >> 8).astype(np.uint8))
    (tmp_path / "train" / "a" / "y.tif").write_bytes(b"")
    Image.fromarray(np.ones((4, 4), np.float32)).save(tmp_path / "train" / "a" / "y.tif")
    with pytest.raises(UserError, match=r"floating-point image \(Pillow mode F\).*8- or 16-bit"):
        ds = build_dataset(str(tmp_path), "train")
        [ds[i] for i in range(len(ds))]
