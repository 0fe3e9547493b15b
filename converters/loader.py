"""One loader for every ResNet checkpoint layout the suite meets.

    bb = load_backbone(path)   # -> Backbone(arch, state_dict, layout, meta)
    model = build_resnet(bb)   # torchvision ResNet, fc = Identity, loaded strict

Layouts are detected from the keys, never from the file name:

    moco-bench     our pretrain checkpoints ({"format": "moco-bench.pretrain/1", "backbone_prefix": ...})
    moco-official  facebookresearch/moco: state_dict["module.encoder_q.*"] (+ encoder_k, queue, queue_ptr)
    mmselfsup      mmselfsup / OpenSelfSup: state_dict["backbone.*"] or state_dict["encoder_q.0.*"]
    mmseg          the file `python -m converters mmseg` writes (state_dict["backbone.*"])
    torchvision    a plain torchvision state dict, optionally "module."-prefixed or wrapped
                   in {"state_dict": ...} / {"model": ...}
    detectron2     a Detectron2 .pkl ({"model": {"stem.conv1.weight": ndarray, ...}}), e.g. ours
                   or MoCo's convert-pretrain-to-detectron2.py output

Safety: every file is read by converters.reader.read_checkpoint, which runs nothing the file
contains: objects outside its allow-list (mmengine's MessageHub, argparse.Namespace, ...) become
inert placeholders beside the tensors. A file whose pickle would call code, or whose tensors only
its own code can rebuild, is refused unless allow_pickle=True (CLI --allow-pickle).
"""
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mocobench.errors import UserError
from mocobench.fileio import PRETRAIN_CHECKPOINT_FORMAT as PRETRAIN_FORMAT
from mocobench.state import compare_state
from converters import archs
from converters.formats import MMSEG_FORMAT
from converters.names import d2_to_tv
from converters.reader import Placeholder, read_checkpoint
SUPPORTED = ("moco-bench pretrain checkpoint; MoCo official (module.encoder_q.*); "
             "mmselfsup/OpenSelfSup (backbone.*, encoder_q.0.*); torchvision state dict "
             "(conv1/bn1/layer1-4, optionally module.*); Detectron2 .pkl (stem.*, res2-res5)")

# (prefix, layout) tried in order on torchvision-named keys; the longest, most specific first,
# because "encoder_q." would otherwise swallow OpenSelfSup's "encoder_q.0.".
TV_PREFIXES = [
    ("module.encoder_q.0.", "mmselfsup"),
    ("encoder_q.0.", "mmselfsup"),
    ("module.encoder_q.", "moco-official"),
    ("encoder_q.", "moco-official"),
    ("module.backbone.", "mmselfsup"),
    ("backbone.", "mmselfsup"),
    ("module.", "torchvision"),
    ("", "torchvision"),
]
# Detectron2 names: a bare .pkl, or the backbone of a Detectron2 model (FPN nests it in bottom_up).
D2_PREFIXES = ["", "backbone.bottom_up.", "backbone.", "module."]


@dataclass
class Backbone:
    """A ResNet backbone in torchvision names.

    arch: torchvision constructor name, e.g. "resnet50".
    state_dict: every key of torchvision's model except fc.*, as CPU tensors.
    layout: where it came from ("moco-bench", "moco-official", "mmselfsup", "mmseg",
        "torchvision", "detectron2").
    meta: what the file said about itself (normalization, image_size, method, epoch, ...),
        plus "source", "arch_from" and "dropped" ({category: [source keys]}) for reports.
    """
    arch: str
    state_dict: dict
    layout: str
    meta: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- layouts

def _tensors(d) -> dict:
    """The array-valued entries of a dict, as tensors ({} when `d` is not a dict)."""
    if not isinstance(d, dict):
        return {}
    out = {}
    for k, v in d.items():
        if isinstance(v, torch.Tensor):
            out[k] = v
        elif isinstance(v, np.ndarray) and v.dtype != object:
            out[k] = torch.from_numpy(np.array(v))  # a copy; keeps 0-d counters 0-d
    return out


def _prefixes_found(keys, limit=8) -> str:
    found = sorted({".".join(k.split(".")[:2]) + ("." if k.count(".") >= 2 else "") for k in keys})
    if not found:
        return "none"
    return ", ".join(found[:limit]) + (f", ... ({len(found)} in all)" if len(found) > limit else "")


def _is_tv(sd, prefix):
    return f"{prefix}conv1.weight" in sd and f"{prefix}layer1.0.conv1.weight" in sd


def _is_d2(sd, prefix):
    return f"{prefix}stem.conv1.weight" in sd and f"{prefix}res2.0.conv1.weight" in sd


def _category(key: str) -> str:
    """Why a non-backbone key was dropped (for the report table)."""
    parts = key.split(".")
    if "encoder_k" in parts or any(p.startswith("momentum") for p in parts):
        return "momentum encoder"
    if any(p.startswith("queue") for p in parts):
        return "queue"
    if parts[-1] == "num_batches_tracked" and "fc" not in parts:
        return "BN counters"
    if any(p in ("fc", "neck", "head", "heads", "projector", "predictor") for p in parts) \
            or "encoder_q.1" in key:
        return "head"
    return "other"


def _carried(meta: dict) -> dict:
    """What a file says about its weights that travels on through conversions."""
    return {k: meta[k] for k in ("arch", "method", "epoch", "step", "normalization", "image_size",
                                 "git_sha") if k in meta}


def _detect(obj, path):
    """-> (layout, tensors with source names, prefix, naming "tv" | "d2", file meta)."""
    if isinstance(obj, Placeholder):  # e.g. torch.save(model): a whole pickled object
        raise UserError(f"checkpoint {path} holds a pickled {obj.pickled_global} object, not a dict of "
                        f"tensors; save its state_dict() with torch.save instead (supported: {SUPPORTED})")
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict of tensors; "
                        f"supported layouts: {SUPPORTED}")
    meta = {}
    if obj.get("format") == PRETRAIN_FORMAT:
        sd, prefix = _tensors(obj.get("state_dict")), obj.get("backbone_prefix", "encoder_q.")
        if not _is_tv(sd, prefix):
            raise UserError(f"checkpoint {path} says {PRETRAIN_FORMAT} but has no "
                            f"{prefix}conv1.weight/{prefix}layer1.*; it is corrupt, re-save it")
        return "moco-bench", sd, prefix, "tv", _carried(obj)

    candidates = [obj.get("state_dict"), obj.get("model"), obj]
    for sd in map(_tensors, candidates):
        if not sd:
            continue
        for prefix, layout in TV_PREFIXES:
            if _is_tv(sd, prefix):
                if layout == "mmselfsup" and isinstance(obj.get("meta"), dict) \
                        and obj["meta"].get("format") == MMSEG_FORMAT:
                    layout, meta = "mmseg", _carried(obj["meta"])
                elif layout == "moco-official":  # main_moco.py saves {"epoch", "arch", "state_dict", ...}
                    meta = {k: obj[k] for k in ("arch", "epoch") if isinstance(obj.get(k), (str, int))}
                return layout, sd, prefix, "tv", meta
        for prefix in D2_PREFIXES:
            if _is_d2(sd, prefix):
                if isinstance(obj.get("meta"), dict):
                    meta = _carried(obj["meta"])
                if "__author__" in obj:
                    meta["author"] = obj["__author__"]
                return "detectron2", sd, prefix, "d2", meta
    keys = set().union(*map(_tensors, candidates))
    if not keys:  # arrays nested elsewhere, e.g. a Caffe2 {"blobs": {...}}: show one level down
        keys = {f"{k}.{k2}" if isinstance(v, dict) else str(k) for k, v in obj.items()
                for k2 in (v if isinstance(v, dict) else [None])}
    raise UserError(f"checkpoint {path} has no ResNet backbone in a supported layout (key prefixes "
                    f"found: {_prefixes_found(keys)}); supported: {SUPPORTED}")


# ----------------------------------------------------------------------------- public API

def _split(sd: dict, prefix: str, naming: str, layout: str, path) -> tuple:
    """-> ({torchvision name: tensor} of the backbone, {category: [dropped source keys]})."""
    backbone, dropped, unknown = {}, {}, []
    for key, value in sd.items():
        under = key.startswith(prefix)
        name = key[len(prefix):] if under else None
        if name is not None and naming == "d2":
            name = d2_to_tv(name)
        if name is not None and name.startswith(archs.BACKBONE_ROOTS):
            backbone[name] = value  # prefix stripping and d2_to_tv are injective: no collisions
            continue
        category = _category(key)
        if under and category == "other":
            unknown.append(key)  # under the backbone's prefix but not a ResNet parameter
        dropped.setdefault(category, []).append(key)
    if unknown:
        raise UserError(f"checkpoint {path} ({layout}): keys under {prefix or 'the top level'!r} that "
                        f"no torchvision ResNet has: {', '.join(unknown[:4])}"
                        f"{' ...' if len(unknown) > 4 else ''}; is this a ResNet backbone?")
    return backbone, dropped


def _arch(backbone: dict, said, arch: str | None, path) -> str:
    """The arch the weights are, refusing a file or an `arch` argument that says otherwise."""
    inferred = archs.infer_arch(backbone)
    if said is not None and said != inferred:
        raise UserError(f"checkpoint {path} says arch {said!r} but its weights are a {inferred}; "
                        f"the file is inconsistent")
    if arch is not None:
        archs.check_arch_name(arch)
        if arch != inferred:
            raise UserError(f"checkpoint {path} holds a {inferred} backbone, not {arch}; "
                            f"drop --arch or pass --arch {inferred}")
    return inferred


def load_backbone(path, *, arch: str | None = None, allow_pickle: bool = False) -> Backbone:
    """Read any supported checkpoint and return its backbone in torchvision names.

    Refuses (UserError, one line) a missing, truncated or unrecognised file, a backbone whose keys
    or shapes differ from torchvision's `arch` in any way, and an explicit `arch` the weights
    contradict. BN `num_batches_tracked` counters absent from the source (Detectron2 files carry
    none) are filled with 0; they only matter for BatchNorm(momentum=None), which ResNet never uses.
    Nothing the file contains is run unless allow_pickle and the file needs it (see
    converters.reader); meta["pickle"] says what was kept inert or ran.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} not found; check the path")
    if not path.is_file():
        raise UserError(f"checkpoint {path} is not a file; pass the checkpoint file itself")
    ckpt = read_checkpoint(path, allow_pickle=allow_pickle)
    layout, sd, prefix, naming, meta = _detect(ckpt.obj, path)
    backbone, dropped = _split(sd, prefix, naming, layout, path)

    said = meta.get("arch") if meta.get("arch") in archs.ARCHS else None  # e.g. MoCo's "resnet50w2"
    inferred = _arch(backbone, said, arch, path)
    meta["arch"] = inferred
    meta["arch_from"] = "file" if said else ("argument" if arch else "inferred")

    expected = archs.expected_shapes(inferred)
    filled = [k for k in expected if k not in backbone and k.endswith("num_batches_tracked")]
    backbone.update({k: torch.tensor(0, dtype=torch.long) for k in filled})
    compare_state(backbone, expected, values=False).refuse_unless_equal(
        f"checkpoint {path}, read as a {inferred} backbone,", then="refusing a partial load")
    first = next((k for k in sd if k.startswith(prefix) and (d2_to_tv(k[len(prefix):]) if naming == "d2"
                  else k[len(prefix):]) == "conv1.weight"), None)
    meta.update(source=str(path), dropped=dropped, filled=filled, example_key=first,
                pickle={"outside_allow_list": ckpt.outside, "ran_code": ckpt.ran_code})
    # Module order, so tables and written files read like torchvision's own state dict.
    # float32 whatever the file stored (fp16 exports exist), so every consumer gets torchvision's dtypes.
    state_dict = {k: _canonical(backbone[k]) for k in expected}
    return Backbone(inferred, state_dict, layout, meta)


def _canonical(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return (t.float() if t.is_floating_point() else t.long()).contiguous()


def build_resnet(bb: Backbone) -> torch.nn.Module:
    """torchvision ResNet `bb.arch` with bb's weights (strict) and fc replaced by Identity,
    so model(x) returns the pooled features. Train/eval mode is left to the caller."""
    import torchvision

    # Built on the meta device and filled by assignment: skips a random initialisation that the
    # load would overwrite anyway (about a second for a ResNet-50 on CPU).
    with torch.device("meta"):
        model = getattr(torchvision.models, bb.arch)()
    model.fc = torch.nn.Identity()
    model.load_state_dict({k: v.clone() for k, v in bb.state_dict.items()}, strict=True, assign=True)
    return model
