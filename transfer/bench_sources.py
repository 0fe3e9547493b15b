"""Where the weights of a bench row come from when the bench does not pretrain them: a file
the user has, torchvision's supervised ImageNet weights, or a seeded random initialisation.

The bench resolves these itself, in its own process (on a cluster: the login node, which
can download), before any stage that reads them runs.
"""
import socket
from pathlib import Path

from mocobench.errors import UserError
from mocobench.fileio import atomic_torch_save

DOWNLOAD_TIMEOUT_S = 60


def imagenet_weights_entry(arch: str):
    """torchvision's supervised ImageNet-1k weights of `arch` (its weights API: URL, the
    checksum prefix in the file name, published accuracy)."""
    import torchvision

    try:
        return torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    except (ValueError, AttributeError, KeyError):
        raise UserError(f"torchvision has no ImageNet-1k weights for {arch!r}; use kind: checkpoint "
                        "with a file of your own") from None


def hub_file(url: str) -> Path:
    """Where torch.hub keeps a download of `url` (torch's own cache, $TORCH_HOME)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url.split("?")[0]).name


def hash_prefix(url: str) -> str | None:
    """The sha256 prefix torch.hub file names carry (resnet50-0676ba61.pth -> 0676ba61)."""
    import torch.hub

    m = torch.hub.HASH_REGEX.search(Path(url.split("?")[0]).name)
    return m.group(1) if m else None


def imagenet_weights(arch: str, path: str = "", url: str = "", download: bool = True) -> Path:
    """The supervised ImageNet weights of `arch`: the file at `path`, else torch's hub cache,
    else downloaded from `url` (default: torchvision's) with its checksum verified. Offline,
    a UserError saying which file to place where."""
    if path:
        if Path(path).is_file():
            return Path(path)
        raise UserError(f"supervised ImageNet weights {path} do not exist; place the torchvision "
                        f"{arch} file there or remove the path to use torch's hub cache")
    entry = imagenet_weights_entry(arch)
    source = url or entry.url
    target = hub_file(source)
    if target.is_file():
        return target
    described = (f"{type(entry).__name__}.IMAGENET1K_V1 ({entry.meta['_metrics']['ImageNet-1K']['acc@1']} "
                 f"top-1), {source}")
    if not download:
        raise UserError(f"supervised ImageNet weights are not in {target.parent}/ ({described})")
    _download(source, target, described)
    return target


def _download(url: str, target: Path, described: str) -> None:
    import torch.hub

    prefix = hash_prefix(url)
    print(f"downloading {described} -> {target}", flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # a firewall that drops packets must not hang the bench
    try:
        # writes a temporary file beside target and moves it into place only when complete
        # and its sha256 starts with the prefix in the file name
        torch.hub.download_url_to_file(url, str(target), hash_prefix=prefix, progress=False)
    except RuntimeError as e:
        if "invalid hash value" not in str(e):
            raise
        raise UserError(f"the download of {url} is corrupt ({e}); nothing was kept: retry, or place "
                        f"a good copy at {target}") from None
    except OSError as e:  # URLError, timeouts, a refused connection: offline
        why = getattr(e, "reason", None) or e.strerror or e
        raise UserError(f"supervised ImageNet weights not found and this machine cannot download them "
                        f"({why}): place {target.name} ({described}) in {target.parent}/ or give its "
                        "path in the bench config") from None
    finally:
        socket.setdefaulttimeout(previous)
    if prefix is None:
        print(f"note: {url} names no checksum (torch.hub's NAME-<sha256 prefix>.pth); not verified",
              flush=True)


def checkpoint_file(path: str, label: str) -> Path:
    if not Path(path).is_file():
        raise UserError(f"checkpoint {path} of row {label!r} does not exist")
    return Path(path)


def random_init(arch: str, seed: int, target: Path) -> Path:
    """A seeded random initialisation of torchvision's `arch` (same seed, same bytes)."""
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, weights=None)
    atomic_torch_save(model.state_dict(), target)
    return target
