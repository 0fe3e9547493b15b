"""The evaluated weights, for both engines: read through the one loader
(converters.load_backbone, which runs no pickled code unless allow_pickle), or a seeded
random initialisation; and the check that the config's backbone settings fit them."""
import torch
import torchvision

from mocobench.errors import UserError
from transfer.results import weights_record

RANDOM = "random"


def random_backbone(arch: str, seed: int = 0):
    """torchvision's own initialisation of `arch`, seeded (the random-init baseline)."""
    from converters import Backbone
    from converters.archs import check_arch_name

    check_arch_name(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init = getattr(torchvision.models, arch)().state_dict()
    return Backbone(arch, {k: v for k, v in init.items() if not k.startswith("fc.")}, "random",
                    {"init_seed": seed, "torchvision": torchvision.__version__})


def load_weights(weights: str, arch: str | None, allow_pickle: bool, label: str | None, seed: int = 0):
    """(Backbone, results' weights record) for --weights PATH or --weights random --arch A."""
    from converters import load_backbone

    if weights == RANDOM:
        if not arch:
            raise UserError("--weights random needs an architecture; add --arch resnet50 (or resnet18, ...)")
        bb = random_backbone(arch, seed)
        return bb, weights_record(None, label or f"random init ({arch}, seed {seed})")
    bb = load_backbone(weights, arch=arch, allow_pickle=allow_pickle)
    return bb, weights_record(weights, label, bb.layout)


def check_weights_match(bb, cfg: dict) -> None:
    """Refuse a config whose backbone settings contradict the weights (converters knows them).
    Every layout is checked, Detectron2 .pkl files included."""
    from converters import detectron2_settings
    from transfer.detect.config import get

    bad = []
    for key, want in detectron2_settings(bb).items():
        have = get(cfg, key)
        if isinstance(want, list):
            same = isinstance(have, (list, tuple)) and len(have) == len(want) and all(
                abs(float(a) - float(b)) < 1e-2 for a, b in zip(have, want))
        else:
            same = have == want
        if not same:
            bad.append((key, have, want))
    if bad:
        what = "; ".join(f"{k} is {h!r}, the weights need {w!r}" for k, h, w in bad)
        fix = " ".join(f"{k} {str(w).replace(' ', '')}" for k, _, w in bad)
        raise UserError(f"config does not match the {bb.arch} weights: {what}; pass {fix}")
