"""`transfer detect --resume`, both engines: it continues only a run of the same weights and
defining settings (else one line, before anything is written), and Detectron2's resume reads
only the .pth checkpoints this tool wrote in the folder, never a pickle it names."""
import pickle
from pathlib import Path

import pytest
import torch
import torchvision
from helpers import NEEDS_DETECTRON2

from transfer.results import read_results

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "detection" / "demo_scenes_voc_R18_FPN.yaml"
TINY = ["SOLVER.MAX_ITER", "2", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.CHECKPOINT_PERIOD", "1", "TEST.PRECISE_BN.NUM_ITER", "1", "DATASETS.SCENES.N_TRAIN", "8",
        "DATASETS.SCENES.N_VAL", "4", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "128",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "128", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
        "MODEL.RPN.POST_NMS_TOPK_TRAIN", "50", "MODEL.RPN.POST_NMS_TOPK_TEST", "50",
        "DATALOADER.NUM_WORKERS", "0", "SEED", "0", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
ENGINES = ["torchvision", pytest.param("detectron2", marks=NEEDS_DETECTRON2)]


@pytest.fixture(autouse=True)
def scene_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("MOCO_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def two_weights(tmp_path_factory):
    """Two random-init ResNet-18s (different seeds): two different sets of weights."""
    folder = tmp_path_factory.mktemp("w")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(folder / f"r18_seed{seed}.pth")
        torch.save(torchvision.models.resnet18().state_dict(), paths[-1])
    return paths


def _detect(engine, weights, out, *extra, resume=True):
    from transfer.detect import main

    main(["--config", str(CONFIG), "--weights", str(weights), "--output", str(out), "--engine", engine,
          *(["--resume"] if resume else []), *TINY, *extra])


def _refused(capsys, engine, weights, out, *extra) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _detect(engine, weights, out, *extra)
    assert e.value.code == 2
    # (Detectron2's loggers keep writing to an earlier test's captured stream: only count errors)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0]


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file() and p.name != ".moco-bench.lock"}


@pytest.mark.parametrize("engine", ENGINES)
def test_a_resume_of_another_run_is_refused_before_anything_is_written(engine, two_weights, tmp_path, capsys):
    first, other = two_weights
    _detect(engine, first, tmp_path, resume=False)
    before = _snapshot(tmp_path)
    assert "run_identity.json" in before and "results.json" in before
    err = _refused(capsys, engine, other, tmp_path)
    assert "cannot resume" in err and "weights_sha256" in err
    err = _refused(capsys, engine, first, tmp_path, "SOLVER.BASE_LR", "0.01", "MODEL.RPN.NMS_THRESH", "0.6")
    assert "SOLVER.BASE_LR (0.02 -> 0.01)" in err and "MODEL.RPN.NMS_THRESH (0.7 -> 0.6)" in err
    assert _snapshot(tmp_path) == before  # nothing written, results.json not even moved aside
    # The same run resumes (the output's own settings may change) and stays labelled with its weights.
    _detect(engine, first, tmp_path, "DATALOADER.NUM_WORKERS", "1")
    assert read_results(tmp_path / "results.json")["weights"]["path"] == str(first)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_fresh_run_forgets_the_checkpoints_of_an_earlier_one(engine, two_weights, tmp_path, capsys):
    first, other = two_weights
    _detect(engine, first, tmp_path, resume=False)
    _detect(engine, other, tmp_path, "SOLVER.MAX_ITER", "1", resume=False)  # torchvision: no checkpoint
    fresh = (tmp_path / "detections.json").read_bytes()
    # Torchvision: nothing to resume, a fresh run again; Detectron2: the second run's model_final.
    # Never the first run's model under the second run's label.
    _detect(engine, other, tmp_path, "SOLVER.MAX_ITER", "1")
    assert (tmp_path / "detections.json").read_bytes() == fresh


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'a').write('x')",))


@NEEDS_DETECTRON2
def test_a_detectron2_resume_loads_only_checkpoints_it_wrote(two_weights, tmp_path, capsys):
    first, _ = two_weights
    out = tmp_path / "out"
    _detect("detectron2", first, out, resume=False)
    marker = tmp_path / "PWNED"
    state = torch.load(out / "model_final.pth", weights_only=True)
    with open(out / "model_0000004.pkl", "wb") as f:
        pickle.dump({**state, "x": _RunsCode(marker)}, f)
    outside = tmp_path / "elsewhere.pth"
    outside.write_bytes((out / "model_final.pth").read_bytes())
    for named in ("model_0000004.pkl", str(outside), "../elsewhere.pth"):
        (out / "last_checkpoint").write_text(named)
        assert "not a checkpoint this tool writes" in _refused(capsys, "detectron2", first, out)
    torch.save({**state, "x": _RunsCode(marker)}, out / "model_0000001.pth")  # a .pth that runs code
    (out / "last_checkpoint").write_text("model_0000001.pth")
    assert "cannot be resumed from" in _refused(capsys, "detectron2", first, out)
    assert not marker.exists()
