"""report: tables from hand-written results.json fixtures (tests/fixtures/results/).

Expected cells are recomputed here from the fixture files themselves (mean,
sample std, delta of the printed numbers), never pasted from report output.
"""
import csv
import io
import json
import re
import shutil
import statistics
from pathlib import Path

import pytest

from mocobench.errors import UserError
from transfer import report as rp
from transfer.paper_numbers import ANCHORS
from transfer.results import read_results, write_results

FIX = Path(__file__).parent / "fixtures" / "results"
GOOD = FIX / "good"


def fixture_runs(*subdirs):
    """(label, engine / protocol) -> list of metric dicts of ok runs, read with plain json."""
    runs, not_ok = {}, {}
    for sub in subdirs:
        for p in sorted((GOOD / sub).rglob("results.json")):
            r = json.loads(p.read_text())
            key = (r["weights"]["label"], f"{r['engine']} / {r['protocol']['name']}")
            if r.get("status", "ok") == "ok":
                runs.setdefault(key, []).append(r["metrics"])
            else:
                not_ok[key] = r
    return runs, not_ok


def expected_cell(values, base_values=None, digits=1):
    mean = statistics.fmean(values)
    text = f"{mean:.{digits}f}"
    if len(values) > 1:
        text += f"±{statistics.stdev(values):.{digits}f}"
    if base_values is not None:
        # the delta of the printed numbers, as the paper prints it
        d = float(f"{mean:.{digits}f}") - float(f"{statistics.fmean(base_values):.{digits}f}")
        d = round(d, digits) + 0.0
        text += f" ({d:+.{digits}f})"
    return text


def table_for(tables, task, dataset):
    (t,) = [t for t in tables if t["task"] == task and t["dataset"] == dataset]
    return t


def row(table, label, setting=None):
    (r,) = [r for r in table["rows"] if r["label"] == label and (setting is None or r["setting"] == setting)]
    return r


@pytest.fixture(scope="module")
def tables():
    return rp.build_tables(rp.load_results([GOOD]))


def test_linear_deltas_mean_std_and_mixed_protocols(tables):
    t = table_for(tables, "linear", "fashion-mnist")
    runs, _ = fixture_runs("linear_fast", "linear_paper")
    assert t["mixed_settings"] and t["settings"] == ["sklearn / fast", "torch / paper"]
    header, body = rp.table_rows(t)
    assert header[:3] == ["pretraining", "engine / protocol", "runs"]
    checked = 0
    for (label, setting), metric_dicts in runs.items():
        base = runs[("supervised (same data)", setting)]  # baseline of the same protocol only
        r = row(t, label, setting)
        assert r["runs"] == len(metric_dicts)
        for m in ("top1", "top5"):
            vals = [d[m] for d in metric_dicts]
            is_base = label == "supervised (same data)"
            want = expected_cell(vals, None if is_base else [d[m] for d in base])
            assert r["cells"][m]["text"] == want, (label, setting, m)
            assert r["cells"][m]["mean"] == pytest.approx(statistics.fmean(vals))
            checked += 1
        assert [label, setting, str(len(metric_dicts))] in [line[:3] for line in body]
    assert checked == 12
    # three seeds of MoCo v2 under the fast protocol: mean ± std shown
    assert "±" in row(t, "MoCo v2 demo", "sklearn / fast")["cells"]["top1"]["text"]
    assert "±" not in row(t, "MoCo v2 demo", "torch / paper")["cells"]["top1"]["text"]


def test_missing_row_is_shown_with_its_reason(tables):
    t = table_for(tables, "linear", "fashion-mnist")
    _, not_ok = fixture_runs("linear_fast")
    (key, rec), = not_ok.items()
    r = row(t, *key)
    assert r["status"] == "missing" and r["runs"] == 0
    assert all(c["text"] == "missing" for c in r["cells"].values())
    assert any(rec["reason"] in n for n in t["notes"])
    grid = rp.render([t], "grid")
    assert key[0] in grid and "missing" in grid and rec["reason"] in grid
    # a missing supervised row must not become the default baseline
    assert "baseline for sklearn / fast: supervised (same data)" in t["notes"]


def test_failed_row_and_detectron2_mask_metrics(tables):
    t = table_for(tables, "detect", "coco_2017_val")
    runs, not_ok = fixture_runs("detect_coco")
    assert t["metrics"] == ["AP50", "AP", "AP75", "mask_AP50", "mask_AP", "mask_AP75"]
    base = runs[("supervised IN-1k (torchvision)", "detectron2 / coco_R_50_FPN_2x")][0]
    moco = runs[("MoCo v1 200ep", "detectron2 / coco_R_50_FPN_2x")][0]
    pairs = [("AP", "bbox/AP"), ("AP50", "bbox/AP50"), ("mask_AP", "segm/AP"), ("mask_AP75", "segm/AP75")]
    for m, src in pairs:
        assert row(t, "MoCo v1 200ep")["cells"][m]["text"] == expected_cell([moco[src]], [base[src]])
    (key, _), = not_ok.items()
    assert row(t, key[0])["status"] == "failed"
    assert all(c["text"] == "failed" for c in row(t, key[0])["cells"].values())


def test_paper_rows_beside_paper_protocol(tables):
    t = table_for(tables, "detect", "voc_2007_test")
    (anchor,) = [a for a in ANCHORS if a["id"] == "voc_c4_24k"]
    paper = [r for r in t["rows"] if r["kind"] == "paper"]
    assert [r["label"] for r in paper] == list(anchor["rows"])
    pbase = anchor["rows"][anchor["baseline"]]
    for label, vals in anchor["rows"].items():
        for m, v in vals.items():
            want = expected_cell([v], None if label == anchor["baseline"] else [pbase[m]])
            assert row(t, label)["cells"][m]["text"] == want
    # our rows are compared with our supervised row, never with the paper's
    runs, _ = fixture_runs("detect_voc")
    ours = runs[("MoCo v1 200ep", "detectron2 / pascal_voc_R_50_C4_24k")]
    sup = runs[("supervised IN-1k (torchvision)", "detectron2 / pascal_voc_R_50_C4_24k")]
    assert row(t, "MoCo v1 200ep")["cells"]["AP"]["text"] == expected_cell(
        [d["AP"] for d in ours], [d["AP"] for d in sup])
    assert any(anchor["source"] in n for n in t["notes"])
    # the cell exactly as the MoCo detection README prints it (55.9 over supervised 53.5)
    assert row(t, "paper: MoCo v1 200ep")["cells"]["AP"]["text"] == "55.9 (+2.4)"


def test_no_paper_rows_for_demo_or_other_datasets(tables):
    # linear "paper" protocol on Fashion-MNIST is not the paper's ImageNet setting
    for task, ds in [("linear", "fashion-mnist"), ("segment", "fmnist-scenes"), ("knn", "fashion-mnist")]:
        assert not [r for r in table_for(tables, task, ds)["rows"] if r["kind"] == "paper"]


def test_paper_linear_rows_on_imagenet(tmp_path):
    src = json.loads((GOOD / "linear_paper" / "moco_v2" / "results.json").read_text())
    src["dataset"] = {"name": "imagenet", "splits": {"train": 1281167, "val": 50000}}
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.json").write_text(json.dumps(src))
    (t,) = rp.build_tables(rp.load_results([tmp_path]))
    r = row(t, "paper: MoCo v2 200ep")
    assert r["cells"]["top1"]["text"] == "67.5±0.1" and r["cells"]["top5"]["text"] == rp.NO_VALUE


def test_baseline_option_and_unknown_baseline():
    records = rp.load_results([GOOD / "knn"])
    (t,) = rp.build_tables(records, baseline="random init")
    runs, _ = fixture_runs("knn")
    rand = runs[("random init", "torch / knn")][0]["knn_top1"]
    sup = runs[("supervised (same data)", "torch / knn")][0]["knn_top1"]
    assert row(t, "supervised (same data)")["cells"]["knn_top1"]["text"] == expected_cell([sup], [rand])
    assert row(t, "random init")["is_baseline"]
    with pytest.raises(UserError, match=r"--baseline 'nope' matches no row; labels found: .*random init"):
        rp.build_tables(records, baseline="nope")


def test_digits_configurable():
    (t,) = rp.build_tables(rp.load_results([GOOD / "segment_demo"]), digits=2)
    runs, _ = fixture_runs("segment_demo")
    moco = runs[("MoCo v2 demo", "mmseg / demo")][0]["mIoU"]
    sup = runs[("supervised (same data)", "mmseg / demo")][0]["mIoU"]
    assert row(t, "MoCo v2 demo")["cells"]["mIoU"]["text"] == expected_cell([moco], [sup], digits=2)
    with pytest.raises(UserError, match="--digits 9 is out of range"):
        rp.build_tables([], digits=9)


def test_every_format_parses(tables):
    rows = csv.reader(io.StringIO(rp.render(tables, "csv")))
    header, *body = list(rows)
    assert header[:6] == ["task", "dataset", "pretraining", "engine / protocol", "runs", "status"]
    assert {"top-1", "kNN top-1", "AP50", "mask AP", "mIoU"} <= set(header)
    assert all(len(line) == len(header) for line in body)
    assert len(body) == sum(len(t["rows"]) for t in tables)
    missing = [line for line in body if line[2] == "supervised ImageNet (torchvision)"]
    assert missing[0][header.index("top-1")] == "missing"

    data = json.loads(rp.render(tables, "json"))
    assert [t["title"] for t in data["tables"]] == [t["title"] for t in tables]
    lin = [t for t in data["tables"] if t["task"] == "linear"][0]
    assert row(lin, "MoCo v2 demo", "sklearn / fast")["cells"]["top1"]["n"] == 3

    gh = rp.render(tables, "github")
    assert gh.count("### ") == len(tables) and "|---" in gh
    assert rp.render(tables, "latex").count("\\begin{tabular}") == len(tables)
    grid = rp.render(tables, "grid").splitlines()
    assert sum(line.startswith("+=") for line in grid) == len(tables)
    assert all(t["title"] in grid for t in tables)


def test_nan_metric_keeps_json_valid(tmp_path):
    src = json.loads((GOOD / "knn" / "moco_v2" / "results.json").read_text())
    src["metrics"]["knn_top1"] = None  # write_results writes an undefined metric as null
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "results.json").write_text(json.dumps(src))
    (t,) = rp.build_tables(rp.load_results([tmp_path]))
    assert t["rows"][0]["cells"]["knn_top1"]["text"] == "nan"
    cell = json.loads(rp.render([t], "json"))["tables"][0]["rows"][0]["cells"]["knn_top1"]
    assert cell["mean"] is None


def test_cli_writes_report_md_and_charts(tmp_path, capsys):
    work = tmp_path / "runs"
    shutil.copytree(GOOD, work)
    # overlapping folders: a run must not be counted twice
    rp.main([str(work), str(work / "linear_fast"), "--format", "csv"])
    out, err = capsys.readouterr()
    body = list(csv.reader(io.StringIO(out)))[1:]
    moco_fast = [line for line in body if line[2] == "MoCo v2 demo" and line[3] == "sklearn / fast"]
    assert moco_fast[0][4] == "3"
    md = work / "report.md"  # default --output: the first DIR
    assert f"wrote {md}" in err
    text = md.read_text()
    tables = rp.build_tables(rp.load_results([GOOD]))
    for t in tables:
        png = work / f"{rp.slug(t)}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"### {t['title']}" in text and f"]({png.name})" in text
    assert "paper: MoCo v1 200ep" in text and "missing" in text


@pytest.mark.parametrize("make, match", [
    (lambda tmp: tmp / "empty", r"^error: no results\.json under .*empty; pass the --output folder"),
    (lambda tmp: tmp / "nowhere", r"^error: .*nowhere does not exist; pass folders holding results\.json"),
    (lambda tmp: FIX / "bad" / "invalid", r"^error: .*invalid/results\.json: missing field 'metrics'"),
    (lambda tmp: FIX / "bad" / "notjson", r"^error: .*notjson/results\.json is not valid JSON"),
])
def test_bad_input_gives_one_line(tmp_path, capsys, make, match):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        rp.main([str(make(tmp_path)), "--output", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.search(match, err.strip())
    assert not (tmp_path / "out" / "report.md").exists()


def test_missing_status_round_trip_and_validation(tmp_path):
    common = dict(task="linear", dataset={"name": "fashion-mnist", "splits": {}},
                  weights={"path": None, "sha256": None, "label": "supervised ImageNet", "layout": None},
                  engine="sklearn", protocol="fast", config={}, seed=0, wall_time_s=0.0, metrics={})
    p = write_results(tmp_path / "a", status="missing", reason="place the file there", **common)
    rec = read_results(p)
    assert rec["status"] == "missing" and rec["reason"] == "place the file there"
    # an ordinary result is unchanged: no status field, read as "ok"
    p = write_results(tmp_path / "b", **{**common, "metrics": {"top1": 1.0}})
    assert "status" not in read_results(p)
    with pytest.raises(UserError, match="status 'missing' needs a 'reason'"):
        write_results(tmp_path / "c", status="missing", **common)
    with pytest.raises(UserError, match="status 'gone' is not one of ok, missing, failed"):
        write_results(tmp_path / "d", status="gone", reason="x", **common)


def test_two_published_settings_in_one_table(tmp_path):
    # COCO FPN 2x and C4 2x results on one dataset: one table, each paper block beside its protocol
    shutil.copytree(GOOD / "detect_coco", tmp_path / "fpn")
    src = json.loads((GOOD / "detect_coco" / "moco_v1" / "results.json").read_text())
    src["protocol"]["name"] = src["config"]["name"] = "coco_R_50_C4_2x"
    src["metrics"] = {"AP": 40.1, "AP50": 60.2, "AP75": 43.5}
    (tmp_path / "c4").mkdir()
    (tmp_path / "c4" / "results.json").write_text(json.dumps(src))
    (t,) = rp.build_tables(rp.load_results([tmp_path]))
    assert t["mixed_settings"]
    header, body = rp.table_rows(t)
    assert header[1] == "engine / protocol"
    paper = [(line[0], line[1]) for line in body if line[0].startswith("paper: ")]
    assert len(paper) == len(set(paper)) == 4
    assert {s for _, s in paper} == {"paper / coco_fpn_2x", "paper / coco_c4_2x"}
    # our C4 run has no supervised C4 row to compare with: plain numbers and a note saying so
    c4 = row(t, "MoCo v1 200ep", "detectron2 / coco_R_50_C4_2x")
    assert c4["cells"]["AP"]["text"] == f"{src['metrics']['AP']:.1f}"
    assert c4["cells"]["mask_AP"]["text"] == rp.NO_VALUE
    assert any(n.startswith("no deltas for detectron2 / coco_R_50_C4_2x") for n in t["notes"])


@pytest.mark.parametrize("task, protocol, dataset, anchor_id", [
    ("detect", "pascal_voc_R_50_C4_24k", "voc_2007_test", "voc_c4_24k"),
    ("detect", "coco_R_50_C4_1x", "coco_2017_val", "coco_c4_1x"),
    ("detect", "coco_R_50_C4_2x", "coco_2017_val", "coco_c4_2x"),
    ("detect", "coco_R_50_FPN_1x", "coco_2017_val", "coco_fpn_1x"),
    ("detect", "coco_R_50_FPN_2x", "coco_2017_val", "coco_fpn_2x"),
    # transfer/segment.py names the protocol after the schedule and the dataset separately
    ("segment", "fcn_r50_d8_512x512_20k", "voc12aug", "voc_seg"),
    ("segment", "fcn_r50_d8_769x769_40k", "cityscapes", "cityscapes_seg"),
    ("linear", "paper", "imagenet", "in1k_linear"),
    ("segment", "demo_fcn_r18_d8_64x64_300it", "fmnist-scenes", None),
    ("detect", "pascal_voc_R_50_C4_24k_demo", "voc_2007_test", None),
    ("linear", "fast", "imagenet", None),
])
def test_each_paper_protocol_matches_one_anchor(task, protocol, dataset, anchor_id):
    record = {"task": task, "protocol": {"name": protocol}, "config": {}, "dataset": {"name": dataset}}
    hits = [a["id"] for a in ANCHORS if rp._matches(a, record)]
    assert hits == ([anchor_id] if anchor_id else [])


def test_paper_numbers_are_consistent_data():
    for a in ANCHORS:
        assert a["source"] and a["task"] in rp.TASK_METRICS
        assert a["baseline"] is None or a["baseline"] in a["rows"]
        for label, vals in a["rows"].items():
            assert label.startswith("paper: ")
            assert set(vals) <= set(rp.TASK_METRICS[a["task"]]), (a["id"], label)


def test_segmentation_paper_rows_carry_the_protocol_caveat(tmp_path):
    for name in ("supervised", "moco_v2"):
        src = json.loads((GOOD / "segment_demo" / name / "results.json").read_text())
        src["dataset"]["name"], src["protocol"]["name"] = "voc12aug", "fcn_r50_d8_512x512_20k"
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(src))
    (t,) = rp.build_tables(rp.load_results([tmp_path]))
    (voc,) = [a for a in ANCHORS if a["id"] == "voc_seg"]
    mocov1, base = voc["rows"]["paper: MoCo v1 200ep"], voc["rows"][voc["baseline"]]
    want = expected_cell([mocov1["mIoU"]], [base["mIoU"]])
    assert row(t, "paper: MoCo v1 200ep")["cells"]["mIoU"]["text"] == want
    assert row(t, "paper: MoCo v1 200ep")["cells"]["aAcc"]["text"] == rp.NO_VALUE
    assert any("not directly comparable" in n for n in t["notes"])


def test_torchvision_engine_on_a_paper_config_gets_a_caveat(tmp_path):
    # transfer/detect names the protocol "<config stem>@torchvision" for its own engine
    for name in ("supervised", "moco_v1_s0"):
        src = json.loads((GOOD / "detect_voc" / name / "results.json").read_text())
        src["engine"], src["protocol"]["name"] = "torchvision", "pascal_voc_R_50_C4_24k@torchvision"
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(src))
    (t,) = rp.build_tables(rp.load_results([tmp_path]))
    assert [r for r in t["rows"] if r["kind"] == "paper"]
    assert any("measured with detectron2; rows run with torchvision are a different protocol" in n
               for n in t["notes"])
    (d2,) = rp.build_tables(rp.load_results([GOOD / "detect_voc"]))
    assert not any("different protocol" in n for n in d2["notes"])


def test_a_row_that_never_ran_joins_its_tasks_table(tmp_path):
    """The bench writes a missing row without a data set (it never ran); the report shows
    it in that task's table rather than in a table of its own."""
    ran = dict(task="knn", dataset={"name": "fashion-mnist", "splits": {"train": 100, "val": 50}},
               weights={"path": None, "sha256": None, "label": "random init"}, engine="torch",
               protocol="knn", config={}, seed=0, wall_time_s=1.0, metrics={"knn_top1": 61.5})
    write_results(tmp_path / "knn/random-init", **ran)
    write_results(tmp_path / "knn/in1k", **{**ran, "dataset": {"name": "", "splits": {}},
                  "weights": {"path": None, "sha256": None, "label": "supervised IN-1k"},
                  "metrics": {}, "status": "missing", "reason": "place the file"})
    tables = rp.build_tables(rp.load_results([tmp_path]))
    assert len(tables) == 1 and tables[0]["dataset"] == "fashion-mnist"
    assert {r["label"] for r in tables[0]["rows"]} == {"random init", "supervised IN-1k"}
    assert not tables[0]["mixed_settings"]  # the row that never ran has no engine of its own
