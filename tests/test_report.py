"""report: tables from results.json fixtures (tests/fixtures/results/, written by
tests/fixtures/make_results.py with per-example outcomes and full protocol records).

Expected cells are recomputed here from the fixture files themselves (mean, sample std,
delta of the printed numbers, scipy's Welch test, the suite's mean and rank), never pasted
from report output.
"""
import copy
import csv
import io
import json
import os
import re
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest

from mocobench.errors import UserError
from transfer import report as rp
from transfer import report_render, report_tables
from transfer.paper_numbers import ANCHORS
from transfer.results import protocol_record, read_results, write_results

FIX = Path(__file__).parent / "fixtures" / "results"
GOOD = FIX / "good"
LEGACY = FIX / "legacy"


def fixture_runs(*subdirs, root=GOOD):
    """label -> list of (metrics, seed) of ok runs, and label -> record of others, read with
    plain json."""
    runs, not_ok = {}, {}
    for sub in subdirs:
        for p in sorted((root / sub).rglob("results.json")):
            r = json.loads(p.read_text())
            if r.get("status", "ok") == "ok":
                runs.setdefault(r["weights"]["label"], []).append(r["metrics"])
            else:
                not_ok[r["weights"]["label"]] = r
    return runs, not_ok


def printed(x, digits=1):
    return float(f"{x:.{digits}f}")


def table_for(tables, task, dataset, name=None):
    (t,) = [t for t in tables if t["kind"] == "results" and t["task"] == task and t["dataset"] == dataset
            and (name is None or t["protocol"].get("name") == name)]
    return t


def row(table, label):
    (r,) = [r for r in table["rows"] if r["label"] == label]
    return r


@pytest.fixture(scope="module")
def tables():
    return rp.build_tables(rp.load_results([GOOD]), bootstrap=300)


# ----------------------------------------------------------------------------- cells

def test_mean_std_and_deltas_of_the_printed_numbers(tables):
    t = table_for(tables, "linear", "fashion-mnist", "fast")
    runs, _ = fixture_runs("linear_fast")
    base = runs["supervised (same data)"]
    for label, metric_dicts in runs.items():
        r = row(t, label)
        assert r["runs"] == len(metric_dicts)
        for m in ("top1", "top5"):
            vals = [d[m] for d in metric_dicts]
            cell = r["cells"][m]
            assert cell["mean"] == pytest.approx(statistics.fmean(vals))
            assert cell["std"] == (pytest.approx(statistics.stdev(vals)) if len(vals) > 1 else None)
            assert cell["text"].startswith(f"{statistics.fmean(vals):.1f}"
                                           + (f"±{statistics.stdev(vals):.1f}" if len(vals) > 1 else ""))
            if label != "supervised (same data)":
                base_mean = statistics.fmean([d[m] for d in base])
                want = round(printed(statistics.fmean(vals)) - printed(base_mean), 1)
                assert cell["delta"] == pytest.approx(want)
                assert f"({want:+.1f} [" in cell["text"]
    assert row(t, "MoCo v2 demo")["variance"] == "3 fine-tuning seeds"
    assert row(t, "random init")["variance"] == "1 run"


def test_every_row_with_outcomes_gets_an_interval_around_its_value(tables):
    for t in (t for t in tables if t["kind"] == "results"):
        assert not any("no interval for" in n for n in t["notes"]), t["notes"]  # identity held
        for r in t["rows"]:
            for m, c in r["cells"].items():
                if r["kind"] == "ours" and r["status"] == "ok" and c["ci"] is not None:
                    lo, hi = c["ci"]
                    assert lo <= c["mean"] + 1e-9 and c["mean"] - 1e-9 <= hi, (t["title"], r["label"], m)
                    assert f"[{lo:.1f}, {hi:.1f}]" in c["text"]
    seg = table_for(tables, "segment", "fmnist-scenes")
    assert all(row(seg, label)["cells"]["mIoU"]["ci"] for label in ("random init", "MoCo v2 demo"))


def test_interpolated_ap_intervals_are_said_to_be_approximate(tables):
    """Detection AP is biased on a small test set and no interval covers it at 95% in every
    regime (docs/report.md): its tables say so, naming the metrics; others do not."""
    from transfer.report_uncertainty import AP_COVERAGE

    for task, dataset in [("detect", "demo_scenes_coco_val"), ("detect", "demo_scenes_voc_test")]:
        t = table_for(tables, task, dataset)
        (note,) = [n for n in t["notes"] if "interpolated AP" in n]
        named = note.split(": ")[0].split(", ")
        assert {"AP", "AP50", "AP75"} <= set(named) and all(m.removeprefix("mask_") in ("AP", "AP50", "AP75")
                                                             for m in named), note
        assert f"{AP_COVERAGE[0]:.0%}-{AP_COVERAGE[1]:.0%}" in note and "docs/report.md" in note, note
    for t in (table_for(tables, "segment", "fmnist-scenes"), table_for(tables, "linear", "fashion-mnist", "fast")):
        assert not any("interpolated AP" in n for n in t["notes"]), t["notes"]


def test_delta_whose_interval_contains_zero_is_marked_not_significant(tables):
    seen = {True: 0, False: 0}
    for t in (t for t in tables if t["kind"] == "results"):
        for r in t["rows"]:
            for c in r["cells"].values():
                if c.get("delta_ci") is None:
                    continue
                contains = c["delta_ci"][0] <= 0 <= c["delta_ci"][1]
                assert c["significant"] is (not contains and (c["seed_p"] is None or c["seed_p"] < 0.05))
                assert ("n.s." in c["text"]) is (c["significant"] is False)
                seen[contains] += 1
    assert seen[True] and seen[False]  # the fixtures hold both kinds
    coco = table_for(tables, "detect", "demo_scenes_coco_val")
    moco = [c for c in row(coco, "MoCo v1 demo")["cells"].values() if c["delta"] is not None]
    if all(c["significant"] is False for c in moco):
        assert any("no significant difference from the baseline at this scale" in n for n in coco["notes"])


def test_delta_interval_is_paired_on_the_same_redraws():
    """The table's delta interval is that of (row - baseline) on the SAME redraws of the test
    images (and the same jackknife replicates: BCa), recomputed here from the outcome files; it
    is far narrower than pairing each row with independent redraws would give (the rows share
    which images are hard)."""
    from transfer import outcomes
    from transfer.uncertainty import bca_ci, jackknife, percentile_ci, resamples

    (t,) = rp.build_tables(rp.load_results([GOOD / "segment_demo"]), bootstrap=400, seed=7)
    ev = {}
    for name in ("moco_v2", "supervised"):
        path = GOOD / "segment_demo" / name / "results.json"
        ev[name] = outcomes.read(path, json.loads(path.read_text()))
    n = len(ev["moco_v2"].keys)

    def values(e, weights):
        return np.concatenate([e.evaluate(w, {"mIoU": "mIoU"})["mIoU"] for w in weights])

    def delta(weights):
        return values(ev["moco_v2"], weights) - values(ev["supervised"], weights)

    redraws = list(resamples(n, 400, 7))
    paired = bca_ci(delta(redraws), delta([np.ones((1, n))])[0], delta(list(jackknife(n, 7))))
    unpaired = percentile_ci(values(ev["moco_v2"], redraws) - values(ev["supervised"], resamples(n, 400, 8)))
    cell = row(t, "MoCo v2 demo")["cells"]["mIoU"]
    assert cell["delta_ci"] == pytest.approx(paired)
    assert paired[1] - paired[0] < 0.5 * (unpaired[1] - unpaired[0])


def test_charts_mark_not_significant_deltas_and_draw_the_intervals(tables):
    from matplotlib.figure import Figure

    coco = table_for(tables, "detect", "demo_scenes_coco_val")
    ax = Figure().add_subplot(1, 1, 1)
    rows = [r for r in coco["rows"] if r["status"] == "ok"]
    report_render._bars(ax, coco, rows, 0.4)
    texts = [a.get_text() for a in ax.texts]
    marked = [c for r in rows for m, c in r["cells"].items() if c["significant"] is False]
    assert sum(t.endswith(" n.s.") for t in texts) == len(marked) > 0
    caps = [line for line in ax.lines if len(line.get_xdata()) == len(rows[0]["cells"])]
    assert ax.collections and caps  # error bars are drawn


def test_seed_test_is_welch_over_the_fixture_runs(tables):
    from scipy import stats

    t = table_for(tables, "linear", "fashion-mnist", "fast")
    runs, _ = fixture_runs("linear_fast")
    moco = [d["top1"] for d in runs["MoCo v2 demo"]]
    sup = [d["top1"] for d in runs["supervised (same data)"]]
    cell = row(t, "MoCo v2 demo")["cells"]["top1"]
    assert cell["seed_p"] == pytest.approx(stats.ttest_ind(moco, sup, equal_var=False).pvalue)
    assert f", p={cell['seed_p']:.2g}" in cell["text"]
    assert row(t, "random init")["cells"]["top1"]["seed_p"] is None  # one run: no seed test


def test_every_table_says_what_its_uncertainty_covers(tables):
    t = table_for(tables, "linear", "fashion-mnist", "fast")
    (note,) = [n for n in t["notes"] if n.startswith("uncertainty: ")]
    for part in ("MoCo v2 demo over 3 fine-tuning seeds", "1 run, no training-randomness estimate: random init",
                 "each row's weights are 1 pretraining run", "300 bootstrap redraws of the 2000 test images"):
        assert part in note
    for t in (t for t in tables if t["kind"] == "results"):
        assert sum(n.startswith("uncertainty: ") for n in t["notes"]) == 1


def test_pretraining_seeds_are_told_from_fine_tuning_seeds(tmp_path):
    src = GOOD / "linear_fast"
    for name in ("supervised_s0", "moco_v2_s0", "moco_v2_s1"):
        shutil.copytree(src / name, tmp_path / name)
    r = json.loads((tmp_path / "moco_v2_s1/results.json").read_text())
    r["weights"]["sha256"] = "f" * 64  # another pretraining, same label
    (tmp_path / "moco_v2_s1/results.json").write_text(json.dumps(r))
    (t,) = rp.build_tables(rp.load_results([tmp_path]), bootstrap=0)
    assert row(t, "MoCo v2 demo")["variance"] == "2 pretraining runs"
    assert "MoCo v2 demo over 2 pretraining runs" in t["notes"][0]
    assert "no test-set interval (--bootstrap 0)" in t["notes"][0]


def test_bootstrap_is_seeded_and_can_be_turned_off():
    records = rp.load_results([GOOD / "knn"])
    a, b = (rp.build_tables(records, bootstrap=200, seed=s)[0] for s in (1, 1))
    c = rp.build_tables(records, bootstrap=200, seed=2)[0]
    cell = lambda t: row(t, "MoCo v2 demo")["cells"]["knn_top1"]  # noqa: E731
    assert cell(a)["ci"] == cell(b)["ci"] != cell(c)["ci"]
    off = rp.build_tables(records, bootstrap=0)[0]
    assert cell(off)["ci"] is None and "[" not in cell(off)["text"]
    with pytest.raises(UserError, match="--bootstrap -1 is negative"):
        rp.build_tables(records, bootstrap=-1)


def test_outcomes_that_do_not_give_the_reported_metric_get_no_interval(tmp_path):
    shutil.copytree(GOOD / "knn", tmp_path / "knn")
    path = tmp_path / "knn/moco_v2/results.json"
    r = json.loads(path.read_text())
    r["metrics"]["knn_top1"] += 1.0  # results.json no longer what its outcomes say
    path.write_text(json.dumps(r))
    (t,) = rp.build_tables(rp.load_results([tmp_path]), bootstrap=100)
    moco = row(t, "MoCo v2 demo")["cells"]["knn_top1"]
    assert moco["ci"] is None and moco["delta_ci"] is None and moco["significant"] is None
    assert any(n.startswith("MoCo v2 demo (seed 0): its outcomes give knn_top1") and "no interval" in n
               for n in t["notes"])
    assert row(t, "random init")["cells"]["knn_top1"]["ci"] is not None


def test_a_row_whose_outcome_files_are_missing_gets_a_note_not_an_error(tmp_path, capsys):
    """results.json copied without its outcomes: that row has no interval, the report exits 0."""
    shutil.copytree(GOOD / "detect_voc", tmp_path / "detect_voc")
    (tmp_path / "detect_voc/random/detections.json").unlink()
    rp.main([str(tmp_path), "--bootstrap", "50", "--output", str(tmp_path / "out")])
    (t,) = [t for t in rp.build_tables(rp.load_results([tmp_path]), bootstrap=50) if t["kind"] == "results"]
    random = [r for r in t["rows"] if r["label"].startswith("random")]
    assert random and all(c["ci"] is None for r in random for c in r["cells"].values())
    assert any(c["ci"] is not None for r in t["rows"] if not r["label"].startswith("random")
               for c in r["cells"].values())
    assert any("no interval: its outcome file(s) detections.json are missing" in n for n in t["notes"])
    assert "no interval: its outcome file(s) detections.json are missing" in capsys.readouterr().out


def _set_weights(path: Path, **changes) -> None:
    r = json.loads(path.read_text())
    r["weights"].update(changes)
    path.write_text(json.dumps(r))


def test_one_label_over_weights_of_different_methods_is_split(tmp_path):
    """The tester's 'checkpoint_last | 3 runs of 2 pretrainings': every pretraining writes
    checkpoint_last.pth, and the MoCo and supervised runs were averaged into one row."""
    shutil.copytree(GOOD / "detect_voc", tmp_path / "v")
    for sub, method, sha in (("moco_v1_s0", "moco_v1", "b"), ("moco_v1_s1", "moco_v1", "c"),
                             ("supervised", "supervised", "5")):
        _set_weights(tmp_path / "v" / sub / "results.json", label="checkpoint_last", method=method,
                     arch="resnet18", sha256=sha * 64)
    (t,) = [t for t in rp.build_tables(rp.load_results([tmp_path]), bootstrap=0) if t["kind"] == "results"]
    labels = sorted(r["label"] for r in t["rows"] if r["kind"] == "ours")
    assert labels == ["checkpoint_last [moco_v1, resnet18]", "checkpoint_last [supervised, resnet18]",
                      "random init"]
    assert row(t, "checkpoint_last [moco_v1, resnet18]")["runs"] == 2  # two pretraining seeds: one row
    assert any(n.startswith("label 'checkpoint_last' names weights of 2 different methods") for n in t["notes"])
    # the baseline is still found, and a label over one method stays as it is
    assert "baseline: checkpoint_last [supervised, resnet18]" in t["notes"]
    _set_weights(tmp_path / "v/supervised/results.json", label="supervised")
    (t,) = [t for t in rp.build_tables(rp.load_results([tmp_path]), bootstrap=0) if t["kind"] == "results"]
    assert {"checkpoint_last", "supervised"} <= {r["label"] for r in t["rows"]}


def test_default_label_says_what_the_weights_are(tmp_path):
    """No --label: the method and length from the checkpoint, else folder/stem, never the bare
    stem every pretraining shares."""
    from transfer.results import weights_record

    (tmp_path / "run1").mkdir()
    path = tmp_path / "run1" / "checkpoint_last.pth"
    path.write_bytes(b"x")
    assert weights_record(path, meta={"method": "moco_v2", "epoch": 200, "arch": "resnet50"})["label"] \
        == "moco_v2 200ep"
    rec = weights_record(path, meta={"method": "supervised", "epoch": 0, "step": 50, "arch": "resnet18"})
    assert (rec["label"], rec["method"], rec["arch"]) == ("supervised 50 steps", "supervised", "resnet18")
    assert weights_record(path, meta={"arch": "resnet18"})["label"] == "run1/checkpoint_last"
    assert weights_record(path, "mine", meta={"method": "moco_v2"})["label"] == "mine"


def test_rows_scored_on_other_images_are_not_paired(tmp_path):
    shutil.copytree(GOOD / "knn", tmp_path / "knn")
    folder = tmp_path / "knn/random"
    with np.load(folder / "outcomes.npz") as z:
        arrays = dict(z)
    arrays["ids"] = np.array([f"other/{i}" for i in range(len(arrays["ids"]))])
    np.savez_compressed(folder / "outcomes.npz", **arrays)
    (t,) = rp.build_tables(rp.load_results([tmp_path]), bootstrap=100)
    assert row(t, "random init")["cells"]["knn_top1"]["ci"] is None
    assert any(n.startswith("random init: its outcomes are not of the same test images") for n in t["notes"])


def test_missing_and_failed_rows_with_their_reasons(tables):
    t = table_for(tables, "linear", "fashion-mnist", "fast")
    _, not_ok = fixture_runs("linear_fast")
    (label, rec), = not_ok.items()
    r = row(t, label)
    assert r["status"] == "missing" and r["runs"] == 0
    assert all(c["text"] == "missing" for c in r["cells"].values())
    assert any(rec["reason"] in n for n in t["notes"])
    assert "baseline: supervised (same data)" in t["notes"]  # a missing supervised row is no baseline
    coco = table_for(tables, "detect", "demo_scenes_coco_val")
    _, failed = fixture_runs("detect_coco")
    (label, rec), = failed.items()
    assert row(coco, label)["status"] == "failed" and any(rec["reason"] in n for n in coco["notes"])


def test_a_row_that_never_ran_joins_its_tasks_table(tmp_path):
    shutil.copytree(GOOD / "knn/random", tmp_path / "knn/random")
    write_results(tmp_path / "knn/in1k", task="knn", dataset={"name": "", "splits": {}},
                  weights={"path": None, "sha256": None, "label": "supervised IN-1k"}, engine="",
                  protocol={}, config={}, seed=0, wall_time_s=0.0, metrics={}, status="missing",
                  reason="place the file")
    tables = rp.build_tables(rp.load_results([tmp_path]), bootstrap=0)
    assert len(tables) == 1 and {r["label"] for r in tables[0]["rows"]} == {"random init", "supervised IN-1k"}


# ----------------------------------------------------------------------------- protocols

def _result(folder, protocol, label, metrics, sha="1", seed=0):
    write_results(folder, task=protocol["task"], dataset={"name": protocol["dataset"]["name"],
                  "splits": protocol["dataset"]["splits"]},
                  weights={"path": f"/w/{label}.pth", "sha256": sha * 64, "label": label},
                  engine=protocol["engine"], protocol=protocol, config={}, seed=seed,
                  wall_time_s=1.0, metrics=metrics)


def test_spread_metrics_get_no_delta(tmp_path):
    ds = {"name": "fashion-mnist", "splits": {"test": 100}, "classes": 10, "fingerprint": "f"}
    protocol = protocol_record(name="fewshot", task="fewshot", engine="sklearn",
                               metric={"5way5shot": "mean episode accuracy"},
                               schedule={"episodes": 600}, input={}, dataset=ds)
    _result(tmp_path / "a", protocol, "supervised", {"5way5shot": 85.0, "5way5shot_ci95": 0.7}, sha="1")
    _result(tmp_path / "b", protocol, "moco", {"5way5shot": 77.0, "5way5shot_ci95": 0.9}, sha="2")
    (t,) = rp.build_tables(rp.load_results([tmp_path]), bootstrap=0)
    cells = row(t, "moco")["cells"]
    assert cells["5way5shot"]["delta"] == pytest.approx(-8.0)
    assert cells["5way5shot_ci95"]["delta"] is None and "(" not in cells["5way5shot_ci95"]["text"]


def _published_protocol(anchor, **changes):
    """A run's protocol record built from a published entry's spec, with `changes` applied
    ("schedule.iterations": 2 sets one field)."""
    spec = copy.deepcopy(anchor["protocol"])
    for path, value in changes.items():
        part, key = path.split(".", 1)
        spec[part][key] = value
    ds = {"name": "whatever it is called", "splits": spec["dataset"]["splits"],
          "classes": spec["dataset"]["classes"], "fingerprint": "f"}
    return protocol_record(name=anchor["names"][0], task=anchor["task"], engine=spec["engine"],
                           metric={m: f"{p} definition" for m, p in spec["metric"].items()},
                           schedule=spec["schedule"], input=spec["input"], dataset=ds,
                           model=spec.get("model"))


def _anchor(anchor_id):
    (a,) = [a for a in ANCHORS if a["id"] == anchor_id]
    return a


@pytest.mark.parametrize("anchor", ANCHORS, ids=lambda a: a["id"])
def test_published_rows_beside_a_protocol_that_matches_on_every_field(tmp_path, anchor):
    protocol = _published_protocol(anchor)
    metrics = {m: 50.0 for m in anchor["protocol"]["metric"]}
    _result(tmp_path / "a", protocol, "supervised IN-1k", metrics)
    (t,) = rp.build_tables(rp.load_results([tmp_path]), bootstrap=0)
    paper = [r for r in t["rows"] if r["kind"] == "paper"]
    assert [r["label"] for r in paper] == list(anchor["rows"])
    base = anchor["rows"].get(anchor["baseline"], {})
    for r in paper:
        for m, v in anchor["rows"][r["label"]].items():
            mean = v[0] if isinstance(v, list) else v
            text = f"{mean:.1f}" + (f"±{v[1]:.1f}" if isinstance(v, list) else "")
            if base and r["label"] != anchor["baseline"]:
                text += f" ({round(printed(mean) - printed(base[m]), 1):+.1f})"
            assert r["cells"][m]["text"] == text
    assert any(anchor["source"] in n for n in t["notes"])


def test_the_moco_readme_cell_as_printed(tmp_path):
    _result(tmp_path / "a", _published_protocol(_anchor("voc_c4_24k")), "MoCo v1", {"AP": 55.0})
    (t,) = rp.build_tables(rp.load_results([tmp_path]), bootstrap=0)
    assert row(t, "paper: MoCo v1 200ep")["cells"]["AP"]["text"] == "55.9 (+2.4)"  # 55.9 over 53.5


@pytest.mark.parametrize("anchor_id, changes, named", [
    # a 2-iteration run of pascal_voc_R_50_C4_24k
    ("voc_c4_24k", {"schedule.iterations": 2}, ["schedule.iterations: 2 here, 24000 published"]),
    # the torchvision engine scoring VOC with COCO's 101-point AP
    ("voc_c4_24k", {"engine": "torchvision", "metric": {"AP50": "101-point", "AP": "101-point",
                                                        "AP75": "101-point"}},
     ["engine: torchvision here, detectron2 published",
      "metric AP50: '101-point definition' here, published '11-point'"]),
    # a 1-epoch paper-protocol linear run on a 16-image folder named imagenet
    ("in1k_linear", {"schedule.epochs": 1, "dataset": {"splits": {"train": 16, "val": 16}, "classes": 2}},
     ["schedule.epochs: 1 here, 100 published",
      "dataset split sizes: [16, 16] here, [50000, 1281167] published",
      "dataset classes: 2 here, 1000 published"]),
    ("coco_c4_2x", {"input.min_size_test": 600}, ["input.min_size_test: 600 here, 800 published"]),
])
def test_a_shortened_or_retargeted_paper_config_gets_no_published_rows(tmp_path, anchor_id, changes, named):
    anchor = _anchor(anchor_id)
    simple = {k: v for k, v in changes.items() if "." in k}
    protocol = _published_protocol(anchor, **simple)
    if "engine" in changes or "metric" in changes or "dataset" in changes:
        fields = {k: v for k, v in protocol.items() if k != "id"}
        fields["engine"] = changes.get("engine", fields["engine"])
        if "metric" in changes:
            fields["metric"] = {m: f"{p} definition" for m, p in changes["metric"].items()}
        if "dataset" in changes:
            fields["dataset"] = {**fields["dataset"], **changes["dataset"], "name": "imagenet"}
        protocol = protocol_record(**fields)
    _result(tmp_path / "a", protocol, "MoCo", {m: 1.0 for m in anchor["protocol"]["metric"]})
    (t,) = rp.build_tables(rp.load_results([tmp_path]), bootstrap=0)
    assert not [r for r in t["rows"] if r["kind"] == "paper"]
    (note,) = [n for n in t["notes"] if n.startswith(f"no published rows ({anchor_id}")]
    for text in named:
        assert text in note


@pytest.mark.parametrize("changes, named", [
    ({"model.freeze_at": 2}, "model.freeze_at: 2 here, 0 published"),
    ({"schedule.weight_decay": 0.0}, "schedule.weight_decay: 0 here, 0.0001 published"),
    ({"schedule.momentum": 0.95}, "schedule.momentum: 0.95 here, 0.9 published"),
    ({"schedule.gamma": 0.5}, "schedule.gamma: 0.5 here, 0.1 published"),
    ({"schedule.precise_bn_iters": 0}, "schedule.precise_bn_iters: 0 here, 200 published"),
    ({"schedule.images_per_process": 16}, "schedule.images_per_process: 16 here, 2 published"),
    ({"schedule.warmup_iters": 1000}, "schedule.warmup_iters: 1000 here, 100 published"),
    ({"input.random_flip": "none"}, "input.random_flip: none here, horizontal published"),
    ({"input.max_size_test": 1000}, "input.max_size_test: 1000 here, 1333 published"),
    # an RPN/ROI setting the paper left at Detectron2's default: recorded under model.config
    ({"model.config": {**_anchor("voc_c4_24k")["protocol"]["model"]["config"], "MODEL.RPN.NMS_THRESH": 0.6}},
     "model.config.MODEL.RPN.NMS_THRESH: 0.6 here, not published"),
    ({"schedule.config": {"SOLVER.BIAS_LR_FACTOR": 2.0}}, "schedule.config.SOLVER.BIAS_LR_FACTOR: 2 here, not published"),
    ({"schedule.new_field": 1}, "schedule.new_field: 1 here, not published"),  # recorded here only
    ({"model.freeze_at": None}, "model.freeze_at: not recorded here, 0 published"),  # recorded there only
])
def test_any_defining_detection_field_that_differs_loses_the_published_rows(tmp_path, changes, named):
    anchor = _anchor("voc_c4_24k")
    protocol = _published_protocol(anchor, **changes)
    if None in changes.values():  # a field this record lacks
        fields = {k: v for k, v in protocol.items() if k != "id"}
        for path in (p for p, v in changes.items() if v is None):
            part, key = path.split(".", 1)
            fields[part] = {k: v for k, v in fields[part].items() if k != key}
        protocol = protocol_record(**fields)
    _result(tmp_path / "a", protocol, "MoCo", {"AP50": 1.0})
    (t,) = rp.build_tables(rp.load_results([tmp_path]), bootstrap=0)
    assert not [r for r in t["rows"] if r["kind"] == "paper"]
    (note,) = [n for n in t["notes"] if n.startswith("no published rows (voc_c4_24k")]
    assert named in note


def test_two_runs_differing_only_in_iterations_land_in_different_tables(tmp_path):
    base = json.loads((GOOD / "detect_voc/supervised/results.json").read_text())["protocol"]
    fields = {k: v for k, v in base.items() if k != "id"}
    longer = protocol_record(**{**fields, "schedule": {**fields["schedule"], "iterations": 600}})
    _result(tmp_path / "a", protocol_record(**fields), "MoCo", {"AP50": 40.0})
    _result(tmp_path / "b", longer, "MoCo", {"AP50": 45.0})
    tables = rp.build_tables(rp.load_results([tmp_path]), bootstrap=0)
    assert len(tables) == 2 and len({t["title"] for t in tables}) == 2
    for t in tables:
        assert len(t["rows"]) == 1
        assert any(n.startswith("not comparable with the") and "schedule.iterations" in n for n in t["notes"])
        assert any(line.startswith("schedule: iterations ") for line in t["header"])
    assert {t["rows"][0]["cells"]["AP50"]["mean"] for t in tables} == {40.0, 45.0}


def test_each_header_names_protocol_engine_and_defining_fields(tables):
    t = table_for(tables, "detect", "demo_scenes_voc_test")
    proto = json.loads((GOOD / "detect_voc/supervised/results.json").read_text())["protocol"]
    head = "\n".join(t["header"])
    assert f"protocol {proto['name']} [id {proto['id']}], engine detectron2" in head
    assert "VOC07 11-point" in head and "iterations 300" in head and "test 60" in head
    assert "min_size_test 128" in head and "5 classes" in head
    grid = rp.render([t], "grid")
    assert all(line in grid for line in t["header"])


def test_legacy_protocols_are_grouped_by_name_and_get_no_published_rows():
    tables = rp.build_tables(rp.load_results([LEGACY]), bootstrap=100)
    names = sorted(t["protocol"]["name"] for t in tables)
    assert names == ["fast", "pascal_voc_R_50_C4_24k"]
    voc = next(t for t in tables if t["task"] == "detect")
    assert "recorded by name only" in voc["header"][0]
    assert not [r for r in voc["rows"] if r["kind"] == "paper"]
    assert any("no published rows (voc_c4_24k" in n and "recorded by name only" in n for n in voc["notes"])
    assert any("no per-example outcomes" in n for n in voc["notes"])


def test_legacy_protocols_of_other_names_are_other_tables(tmp_path):
    common = dict(task="detect", dataset={"name": "voc_2007_test", "splits": {"test": 4952}},
                  engine="detectron2", config={}, seed=0, wall_time_s=1.0, metrics={"AP": 50.0})
    for name in ("pascal_voc_R_50_C4_24k", "my_voc_R_50_FPN"):  # same engine and data, other configs
        # what the removed protocol-name shim wrote: results files of that time still exist
        legacy = protocol_record(name=name, task="detect", engine="detectron2", metric={},
                                 schedule={"legacy": True}, input={}, dataset=dict(common["dataset"]))
        write_results(tmp_path / name, weights={"path": None, "sha256": None, "label": "MoCo"},
                      protocol=legacy, **common)
    tables = rp.build_tables(rp.load_results([tmp_path]), bootstrap=0)
    assert sorted(t["protocol"]["name"] for t in tables) == ["my_voc_R_50_FPN", "pascal_voc_R_50_C4_24k"]


def test_paper_numbers_are_consistent_data():
    from transfer.report_protocol import differences

    for a in ANCHORS:
        assert a["source"] and a["task"] in report_tables.TASK_METRICS and a["names"]
        assert a["baseline"] is None or a["baseline"] in a["rows"]
        assert {"engine", "metric", "schedule", "input", "dataset"} <= set(a["protocol"]) \
            <= {"engine", "metric", "model", "schedule", "input", "dataset", "complete"}
        assert a["protocol"].get("complete", False) == (a["task"] == "detect")  # detection: full records
        assert {"splits", "classes"} <= set(a["protocol"]["dataset"])
        for label, vals in a["rows"].items():
            assert label.startswith("paper: ")
            assert set(vals) <= set(a["protocol"]["metric"]), (a["id"], label)
        assert differences(a["protocol"], _published_protocol(a)) == []
        # no two published settings can be mistaken for each other (C4 vs FPN, 1x vs 2x)
        for b in ANCHORS:
            if b is not a and b["task"] == a["task"]:
                assert differences(a["protocol"], _published_protocol(b)), (a["id"], b["id"])


# ----------------------------------------------------------------------------- suite summary

def test_suite_summary_mean_and_average_rank_from_the_fixtures(tables):
    (s,) = [t for t in tables if t["kind"] == "summary"]
    per_set, definitions = {}, {}
    for p in sorted((GOOD / "suite").rglob("results.json")):
        r = json.loads(p.read_text())
        metric, text = next(iter(r["protocol"]["metric"].items()))
        definitions.setdefault(text, set()).add(r["dataset"]["name"])
        per_set.setdefault(r["dataset"]["name"], {})[r["weights"]["label"]] = r["metrics"][metric]
    # one headline metric definition per summary: the data sets sharing the most common one
    (kept,) = [names for names in definitions.values() if len(names) >= 2]
    left_out = sorted(set(per_set) - kept)
    assert left_out and any(all(d in n for d in left_out) and n.startswith("not in this summary")
                            for n in s["notes"])
    per_set = {d: v for d, v in per_set.items() if d in kept}
    assert len(s["headers"]) == len(per_set) + 2
    for label in {lab for v in per_set.values() for lab in v}:
        values = [per_set[ds][label] for ds in sorted(per_set)]
        ranks = [1 + sorted(per_set[ds].values(), reverse=True).index(per_set[ds][label])
                 for ds in sorted(per_set)]
        r = row(s, label)
        assert r["mean"] == pytest.approx(statistics.fmean(values))
        assert r["avg_rank"] == pytest.approx(statistics.fmean(ranks))
        assert r["cells"]["mean"]["text"] == f"{statistics.fmean(values):.1f}"
    assert [r["avg_rank"] for r in s["rows"]] == sorted(r["avg_rank"] for r in s["rows"])
    header, body = report_render.table_rows(s)
    assert header[0] == "pretraining" and header[-2:] == ["mean", "avg rank"]


def test_suite_summary_needs_a_value_in_every_column(tmp_path):
    shutil.copytree(GOOD / "suite", tmp_path / "suite")
    shutil.rmtree(tmp_path / "suite/dtd/MoCo_v2_800ep")
    (s,) = [t for t in rp.build_tables(rp.load_results([tmp_path]), bootstrap=0) if t["kind"] == "summary"]
    moco = row(s, "MoCo v2 800ep")
    assert moco["mean"] is None and moco["cells"]["mean"]["text"] == report_tables.NO_VALUE
    assert any("MoCo v2 800ep" in n and "every column" in n for n in s["notes"])


def _restamp(path: Path, **changes) -> None:
    """Rewrite a fixture's protocol (its id recomputed, as a task run that way would write it)."""
    r = json.loads(path.read_text())
    fields = {k: v for k, v in r["protocol"].items() if k != "id"}
    r["protocol"] = protocol_record(**{**fields, **changes})
    r["engine"] = r["protocol"]["engine"]
    path.write_text(json.dumps(r))


def test_suite_summary_never_mixes_engines_or_metric_definitions(tmp_path):
    """The tester's report: VOC and COCO detection, each with Detectron2 and torchvision, under one
    protocol name, were averaged into one 'detect suite: 4 data sets' number."""
    for sub in ("detect_voc", "detect_coco"):
        for engine in ("detectron2", "torchvision"):
            shutil.copytree(GOOD / sub, tmp_path / f"{sub}_{engine}")
            for p in (tmp_path / f"{sub}_{engine}").rglob("results.json"):
                _restamp(p, name="demo", engine=engine)
    tables = rp.build_tables(rp.load_results([tmp_path]), bootstrap=0)
    assert len([t for t in tables if t["kind"] == "results"]) == 4
    assert not [t for t in tables if t["kind"] == "summary"]  # no two columns share engine and metric
    # two VOC-style data sets with one engine: one summary of exactly those two columns
    shutil.copytree(tmp_path / "detect_voc_detectron2", tmp_path / "voc_again")
    for p in (tmp_path / "voc_again").rglob("results.json"):
        r = json.loads(p.read_text())
        r["dataset"]["name"] = "voc_again"
        p.write_text(json.dumps(r))
        _restamp(p, dataset={**r["protocol"]["dataset"], "name": "voc_again"})
    tables = rp.build_tables(rp.load_results([tmp_path]), bootstrap=0)
    (s,) = [t for t in tables if t["kind"] == "summary"]
    assert [h.split()[0] for h in s["headers"][:-2]] == ["demo_scenes_voc_test", "voc_again"]
    assert "detectron2" in s["title"] and any(n.startswith("not in this summary") for n in s["notes"])


def test_a_data_set_under_two_protocols_gets_no_suite_summary(tmp_path):
    shutil.copytree(GOOD / "suite", tmp_path / "suite")
    shutil.copytree(GOOD / "suite/cifar10", tmp_path / "suite/cifar10_long")
    for p in (tmp_path / "suite/cifar10_long").rglob("results.json"):
        schedule = json.loads(p.read_text())["protocol"]["schedule"]
        _restamp(p, schedule={**schedule, "extra_epochs": 100})
    tables = rp.build_tables(rp.load_results([tmp_path]), bootstrap=0)
    assert not [t for t in tables if t["kind"] == "summary"]
    cifar = [t for t in tables if t["kind"] == "results" and t["dataset"] == "cifar10"]
    assert len(cifar) == 2 and all(any(n.startswith("no linear suite summary for cifar10") for n in t["notes"])
                                   for t in cifar)


# ----------------------------------------------------------------------------- formats and CLI

def test_every_format_parses(tables):
    body = list(csv.reader(io.StringIO(rp.render(tables, "csv"))))
    header, body = body[0], body[1:]
    assert header[:7] == ["task", "dataset", "protocol", "protocol id", "pretraining", "runs", "status"]
    assert {"top-1", "kNN top-1", "AP50", "mask AP", "mIoU", "avg rank"} <= set(header)
    assert all(len(line) == len(header) for line in body)
    assert len(body) == sum(len(t["rows"]) for t in tables)
    data = json.loads(rp.render(tables, "json"))
    assert [t["title"] for t in data["tables"]] == [t["title"] for t in tables]
    gh = rp.render(tables, "github")
    assert gh.count("### ") == len(tables) and "|---" in gh
    assert rp.render(tables, "latex").count("\\begin{tabular}") == len(tables)
    grid = rp.render(tables, "grid").splitlines()
    assert sum(line.startswith("+=") for line in grid) == len(tables)


def test_nan_metric_keeps_json_valid(tmp_path):
    src = json.loads((GOOD / "knn/moco_v2/results.json").read_text())
    src["metrics"]["knn_top1"] = None  # write_results writes an undefined metric as null
    del src["outcomes"]
    (tmp_path / "n").mkdir()
    (tmp_path / "n/results.json").write_text(json.dumps(src))
    (t,) = rp.build_tables(rp.load_results([tmp_path]))
    assert t["rows"][0]["cells"]["knn_top1"]["text"] == "nan"
    assert json.loads(rp.render([t], "json"))["tables"][0]["rows"][0]["cells"]["knn_top1"]["mean"] is None


def test_baseline_option_and_unknown_baseline():
    records = rp.load_results([GOOD / "knn"])
    (t,) = rp.build_tables(records, baseline="random init", bootstrap=0)
    runs, _ = fixture_runs("knn")
    rand, sup = runs["random init"][0]["knn_top1"], runs["supervised (same data)"][0]["knn_top1"]
    assert row(t, "supervised (same data)")["cells"]["knn_top1"]["delta"] == pytest.approx(
        round(printed(sup) - printed(rand), 1))
    assert row(t, "random init")["is_baseline"]
    with pytest.raises(UserError, match=r"--baseline 'nope' matches no row; labels found: .*random init"):
        rp.build_tables(records, baseline="nope")
    with pytest.raises(UserError, match="--digits 9 is out of range"):
        rp.build_tables([], digits=9)


def test_cli_writes_report_md_and_charts(tmp_path, capsys):
    work = tmp_path / "runs"
    shutil.copytree(GOOD, work)
    # overlapping folders: a run must not be counted twice
    rp.main([str(work), str(work / "linear_fast"), "--format", "csv", "--bootstrap", "50"])
    out, err = capsys.readouterr()
    body = list(csv.reader(io.StringIO(out)))[1:]
    moco_fast = [line for line in body if line[4] == "MoCo v2 demo" and line[2] == "fast"]
    assert [line[5] for line in moco_fast] == ["3 fine-tuning seeds"]
    md = work / "report.md"  # default --output: the first DIR
    assert f"wrote {md}" in err
    text = md.read_text()
    tables = rp.build_tables(rp.load_results([GOOD]), bootstrap=0)
    for t in tables:
        assert f"### {t['title']}" in text
        if t["kind"] == "summary":
            continue
        png = work / f"{rp.chart_name(t)}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"### {t['title']}" in text and f"]({png.name})" in text
    assert "suite · many-shot" in text and "missing" in text


@pytest.mark.parametrize("make, match", [
    (lambda tmp: tmp / "empty", r"^error: no results\.json under .*empty; pass the --output folder"),
    (lambda tmp: tmp / "nowhere", r"^error: .*nowhere does not exist; pass folders holding results\.json"),
    (lambda tmp: FIX / "bad/invalid", r"^error: .*invalid/results\.json: missing field 'metrics'"),
    (lambda tmp: FIX / "bad/notjson", r"^error: .*notjson/results\.json is not valid JSON"),
    (lambda tmp: _bad(tmp, "3"), r"results\.json holds a number, not a results record"),
    (lambda tmp: _bad(tmp, "null"), r"results\.json holds null, not a results record"),
    (lambda tmp: _bad(tmp, bytes(range(256))), r"results\.json is not a text file"),
    (lambda tmp: _bad_splits(tmp, [1, 2]),
     r"dataset lacks 'splits', a mapping of split name to size, got a list"),
    (lambda tmp: _bad_splits(tmp, {"test": "many"}), r"dataset split 'test' should have a number of images"),
    (lambda tmp: _bad_outcomes(tmp), r"per-example outcomes of .* do not have the documented format"),
])
def test_bad_input_gives_one_line(tmp_path, capsys, make, match):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        rp.main([str(make(tmp_path)), "--output", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.search(match, err.strip()), err
    assert not (tmp_path / "out/report.md").exists()


def _bad(tmp, content):
    p = tmp / "bad/results.json"
    p.parent.mkdir(parents=True)
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return p.parent


def _bad_splits(tmp, splits):
    r = json.loads((GOOD / "knn/random/results.json").read_text())
    r["dataset"]["splits"] = splits
    return _bad(tmp, json.dumps(r))


def _bad_outcomes(tmp):
    shutil.copytree(GOOD / "knn/random", tmp / "bad")
    np.savez_compressed(tmp / "bad/outcomes.npz", labels=np.zeros(5, np.int64),
                        topk=np.zeros((4, 5), np.int64))  # 5 labels, 4 predictions
    return tmp / "bad"


def read_only_folder(tmp_path) -> Path:
    """A folder no file can be created in: mode 555, or (root ignores modes) sysfs."""
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    if os.access(out, os.W_OK):
        return Path("/sys/kernel")
    return out


def test_read_only_output_is_one_line(tmp_path, capsys):
    out = read_only_folder(tmp_path)
    with pytest.raises(SystemExit) as e:
        rp.main([str(GOOD / "knn"), "--output", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(rf"^error: cannot write report in {out}", err), err


def test_missing_status_round_trip_and_validation(tmp_path):
    common = dict(task="linear", dataset={"name": "fashion-mnist", "splits": {}},
                  weights={"path": None, "sha256": None, "label": "supervised ImageNet", "layout": None},
                  engine="sklearn", protocol={}, config={}, seed=0, wall_time_s=0.0, metrics={})
    p = write_results(tmp_path / "a", status="missing", reason="place the file there", **common)
    rec = read_results(p)
    assert rec["status"] == "missing" and rec["reason"] == "place the file there"
    full = protocol_record(name="fast", task="linear", engine="sklearn", metric={"top1": "top-1"},
                           schedule={"l2": 0.1}, input={"crop": 32}, dataset=common["dataset"])
    p = write_results(tmp_path / "b", **{**common, "protocol": full, "metrics": {"top1": 1.0}})
    assert "status" not in read_results(p)
    with pytest.raises(UserError, match="field 'protocol' should be dict, got a str"):  # a bare name says too little
        write_results(tmp_path / "e", **{**common, "protocol": "fast", "metrics": {"top1": 1.0}})
    with pytest.raises(UserError, match="status 'missing' needs a 'reason'"):
        write_results(tmp_path / "c", status="missing", **common)
    with pytest.raises(UserError, match="status 'gone' is not one of ok, missing, failed"):
        write_results(tmp_path / "d", status="gone", reason="x", **common)
