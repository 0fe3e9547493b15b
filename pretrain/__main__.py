"""python -m pretrain --config CONFIG --output DIR [--resume CKPT] [key=value ...]"""
import argparse

from mocobench import dist
from mocobench.config import load_config
from mocobench.errors import cli
from pretrain.config import PretrainConfig
from pretrain.train import train


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pretrain",
        description="MoCo v1/v2 pretraining. Run with torchrun for several processes. "
                    "Resumes from OUTPUT/checkpoint_last.pth automatically.")
    p.add_argument("--config", required=True, help="YAML file, e.g. configs/pretrain/moco_v2_r50_in1k.yaml")
    p.add_argument("--output", required=True, help="folder for config.yaml, log.jsonl and checkpoints")
    p.add_argument("--resume", default=None, help="resume from this checkpoint instead of OUTPUT's last")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. model.arch=resnet18 train.epochs=1 moco.queue_size=4096")
    return p


@cli
def main(argv=None) -> None:
    args = parser().parse_args(argv)
    cfg = load_config(PretrainConfig, args.config, args.overrides)
    try:
        train(cfg, args.output, resume=args.resume)
    finally:
        dist.destroy()  # the process group goes with the run, not with the interpreter


if __name__ == "__main__":
    main()
