"""A user's own VOC and COCO data: read as documented (docs/detection.md), and every problem
found before training, in one line."""
import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from mocobench.errors import UserError
from transfer import scenes as sc
from transfer.detect import datasets as ds

CFG = {"DATASETS": {"ROOT": ""}}


@pytest.fixture(scope="module")
def scenes():
    return sc.compose_scenes(6, seed=1)


@pytest.fixture
def voc(tmp_path, scenes):
    root = sc.write_voc(tmp_path / "My VOC; 'data'", {"trainval": scenes})
    return root


def _spec(root, split="trainval"):
    return ds.resolve(f"voc:{root}:{split}", CFG)


def _first_xml(root):
    return sorted((root / "Annotations").glob("*.xml"))[0]


def test_voc_reads_boxes_classes_and_an_empty_difficult(voc, scenes):
    xml = _first_xml(voc)
    tree = ET.parse(xml)
    tree.find("object/difficult").text = None  # <difficult/>, as some tools write it
    tree.findall("object")[-1].find("difficult").text = "1"
    tree.write(xml)
    records, classes = ds.load_voc(_spec(voc))
    assert classes == sc.CLASSES and len(records) == len(scenes)
    r = records[0]
    assert [a["bbox"] for a in r["annotations"]] == scenes[0].boxes.tolist()
    assert [a["category"] for a in r["annotations"]] == scenes[0].labels.tolist()
    assert [a["difficult"] for a in r["annotations"]] == [0] * (len(scenes[0].labels) - 1) + [1]
    gt = ds.ground_truth(records, classes)
    assert [a["iscrowd"] for a in gt["annotations"][:len(scenes[0].labels)]] == [a["difficult"] for a in r["annotations"]]
    assert [i["id"] for i in gt["images"]] == list(range(1, len(scenes) + 1))


def test_voc_without_its_split_file_names_the_file_to_create(voc):
    with pytest.raises(UserError, match=r"create .*ImageSets/Main/test.txt listing the images of split 'test'"):
        _spec(voc, "test")


def test_class_list_from_the_data_without_background(voc):
    (voc / "classes.txt").write_text("_background_\n" + "\n".join(sc.CLASSES) + "\n")
    assert ds.load_voc(_spec(voc))[1] == sc.CLASSES
    (voc / "classes.txt").write_text("_background_\n")
    with pytest.raises(UserError, match="lists no foreground class"):
        _spec(voc)
    (voc / "classes.txt").write_text("\n".join(sc.CLASSES[:3]) + "\n")
    with pytest.raises(UserError, match="not one of the 3 classes; list them in"):
        ds.load_voc(_spec(voc))


def test_an_object_labelled_background_is_refused(voc):
    xml = _first_xml(voc)
    tree = ET.parse(xml)
    tree.find("object/name").text = "background"
    tree.write(xml)
    with pytest.raises(UserError, match="labels an object 'background', the background"):
        ds.load_voc(_spec(voc))


def test_num_classes_follows_the_data_unless_set_to_something_else():
    cfg = {"MODEL": {"ROI_HEADS": {"NUM_CLASSES": 80}}}
    assert ds.check_num_classes(cfg, sc.CLASSES, "mine", explicit=False) == 10
    with pytest.raises(UserError, match="NUM_CLASSES is 80 but mine has 10 classes.*pass MODEL.ROI_HEADS.NUM_CLASSES 10"):
        ds.check_num_classes(cfg, sc.CLASSES, "mine", explicit=True)


def test_missing_images_and_wrong_sizes_are_found_before_training(voc):
    records, _ = ds.load_voc(_spec(voc))
    ds.check_images(records, "mine")
    jpgs = sorted((voc / "JPEGImages").glob("*.jpg"))
    Image.new("RGB", (100, 128)).save(jpgs[1])
    with pytest.raises(UserError, match=r"000001.jpg is 100x128 but its annotation says 128x128"):
        ds.check_images(records, "mine")
    jpgs[2].unlink()
    with pytest.raises(UserError, match=r"1 of 6 images are missing, e.g. .*000002.jpg"):
        ds.check_images(records, "mine")


def test_a_size_missing_from_the_xml_is_read_from_the_image(voc):
    xml = _first_xml(voc)
    tree = ET.parse(xml)
    tree.getroot().remove(tree.find("size"))
    tree.write(xml)
    records, _ = ds.load_voc(_spec(voc))
    assert records[0]["width"] is None
    ds.check_images(records, "mine", every_image=False)
    assert (records[0]["width"], records[0]["height"]) == (128, 128)


def test_16_bit_images_are_refused(voc):
    records, _ = ds.load_voc(_spec(voc))
    png = voc / "sixteen.png"
    Image.fromarray(np.full((128, 128), 40000, np.uint16)).save(png)
    records[0]["file_name"] = str(png)
    with pytest.raises(UserError, match="16/32-bit.*convert it to 8-bit"):
        ds.check_images(records, "mine")


def _coco(tmp_path, scenes, edit=None):
    data = sc.coco_dict(scenes)
    if edit:
        edit(data)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return ds.resolve(f"coco:{path}:{tmp_path}", CFG)


def test_coco_category_0_is_background(tmp_path, scenes):
    def background_first(data):
        data["categories"].insert(0, {"id": 0, "name": "objects", "supercategory": "none"})  # Roboflow-style
    records, classes = ds.load_coco(_coco(tmp_path, scenes, background_first))
    assert classes == sc.CLASSES
    assert {a["category"] for r in records for a in r["annotations"]} <= set(range(10))

    def labelled_background(data):
        background_first(data)
        data["annotations"][0]["category_id"] = 0
    with pytest.raises(UserError, match="annotation 1 of image 1 has category_id 0, the background"):
        ds.load_coco(_coco(tmp_path, scenes, labelled_background))


def test_test_and_train_class_lists_must_agree(tmp_path, scenes):
    a = sc.write_voc(tmp_path / "a", {"train": scenes})
    b = sc.write_voc(tmp_path / "b", {"train": scenes})
    (b / "classes.txt").write_text("\n".join(reversed(sc.CLASSES)) + "\n")
    with pytest.raises(UserError, match="have different class lists"):
        ds.load_sets([_spec(a, "train"), _spec(b, "train")])



def _edit_first_box(root, **values):
    xml = _first_xml(root)
    tree = ET.parse(xml)
    box = tree.find("object/bndbox")
    for key, value in values.items():
        box.find(key).text = str(value(float(box.findtext(key))) if callable(value) else value)
    tree.write(xml)
    return xml


@pytest.mark.parametrize("swap", [("xmin", "xmax"), ("ymin", "ymax")])
def test_a_voc_box_with_its_max_below_its_min_is_refused(voc, swap):
    xml = _first_xml(voc)
    lo = float(ET.parse(xml).find(f"object/bndbox/{swap[0]}").text)
    _edit_first_box(voc, **{swap[1]: lo - 1})
    with pytest.raises(UserError, match=rf"{xml.name} object 1 \(.*\) has xmin..xmax .*a max below its min"):
        ds.load_voc(_spec(voc))


def test_a_voc_box_outside_its_image_is_refused(voc):
    _edit_first_box(voc, xmax=129)  # 1-based: xmax 128 is the last column; 1 px over is tolerated
    records, _ = ds.load_voc(_spec(voc))
    ds.check_images(records, "mine")
    xml = _edit_first_box(voc, xmax=131, ymin=-2)
    records, _ = ds.load_voc(_spec(voc))
    with pytest.raises(UserError, match=rf"{xml.name} object 1 \(.*\) spans x .*\.\.131, y -3\.\..* outside its "
                                        r"128x128 image"):
        ds.check_images(records, "mine", every_image=False)  # also where the images are not re-read


def test_an_image_listed_twice_in_a_split_is_refused(voc):
    split = voc / "ImageSets" / "Main" / "trainval.txt"
    ids = split.read_text().split()
    split.write_text("\n".join(ids + [ids[1]]) + "\n")
    with pytest.raises(UserError, match=rf"trainval.txt lists '{ids[1]}' twice \(lines 2 and 7\)"):
        ds.load_voc(_spec(voc))


@pytest.mark.parametrize("wh", [(-5, 10), (10, -0.5), (float("nan"), 10)])
def test_a_coco_box_of_negative_size_is_refused(tmp_path, scenes, wh):
    def inverted(data):
        data["annotations"][2]["bbox"][2:] = list(wh)
    with pytest.raises(UserError, match=r"instances.json annotation 3 \(image \d+\) has bbox width"):
        ds.load_coco(_coco(tmp_path, scenes, inverted))


def test_a_coco_box_of_height_0_is_kept_as_detectron2_keeps_it(tmp_path, scenes):
    """COCO train2017 itself has two (e.g. annotation 918: bbox [296.65, 388.33, 1.03, 0.0])."""
    def flat(data):
        data["annotations"][2]["bbox"][3] = 0.0
    records, _ = ds.load_coco(_coco(tmp_path, scenes, flat))
    assert sum(a["bbox"][3] == a["bbox"][1] for r in records for a in r["annotations"]) == 1


def test_a_coco_box_outside_its_image_is_refused(tmp_path, scenes):
    def outside(data):
        data["annotations"][2]["bbox"][0] = data["images"][0]["width"]
    records, _ = ds.load_coco(_coco(tmp_path, scenes, outside))
    with pytest.raises(UserError, match=r"instances.json annotation 3 \(image \d+\) spans x 128\.\..* outside"):
        ds.check_boxes(records, "mine")


@pytest.mark.parametrize("key", ["id", "file_name"])
def test_a_coco_image_listed_twice_is_refused(tmp_path, scenes, key):
    def twice(data):
        data["images"][1][key] = data["images"][0][key]
    with pytest.raises(UserError, match=f"lists two images with {key}"):
        ds.load_coco(_coco(tmp_path, scenes, twice))
