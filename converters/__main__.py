"""python -m converters {detectron2,mmseg,torchvision} IN OUT [--arch A] [--allow-pickle] [--no-verify]

Reads any supported checkpoint layout (see converters.loader) without running its pickled code
(converters.reader), writes the requested format, verifies it (converters.writers /
converters.verify) and prints what was mapped and dropped. docs/converters.md is the user's guide.
"""
import argparse
import sys

from tabulate import tabulate

from mocobench.errors import cli
from converters.archs import ARCHS
from converters.loader import load_backbone
from converters.writers import CONVERTERS

HELP = {
    "detectron2": "Detectron2 .pkl ({'model': {name: ndarray}, '__author__', 'matching_heuristics'})",
    "mmseg": "MMSegmentation .pth ({'state_dict': {'backbone.*': tensor}, 'meta'}) for plain ResNet",
    "torchvision": "torchvision state dict .pth (loads with only fc.* missing)",
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m converters",
        description="Convert a ResNet checkpoint of any supported layout (moco-bench, MoCo official, "
                    "mmselfsup/OpenSelfSup, torchvision, Detectron2 .pkl) and verify the output.")
    sub = p.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for fmt, text in HELP.items():
        s = sub.add_parser(fmt, help=text, description=text)
        s.add_argument("input", help="checkpoint to convert (any supported layout)")
        s.add_argument("output", help="file to write" + (" (must end in .pkl)" if fmt == "detectron2" else ""))
        s.add_argument("--arch", choices=list(ARCHS), help="assert the backbone arch (inferred from the weights otherwise)")
        s.add_argument("--allow-pickle", action="store_true",
                       help="let Python's pickle load a file whose pickle calls code, or whose tensors only "
                            "its own code can rebuild (it runs that code: only for files you trust); other "
                            "pickled objects never need it")
        s.add_argument("--no-verify", action="store_true",
                       help="skip loading the output into the real library (key-set checks always run)")
    return p


def _pickle_line(info: dict) -> str:
    """One line on what reading the file ran (bb.meta["pickle"])."""
    outside = info["outside_allow_list"]
    # HistoryBuffer.min and the like (methods the file refers to) are shown under their class
    outer = [n for n in outside if not any(n.startswith(f"{o}.") for o in outside)]
    shown = ", ".join(outer[:4]) + (f" and {len(outer) - 4} more" if len(outer) > 4 else "")
    if info["ran_code"]:
        return f"read with Python's pickle (--allow-pickle): it imported and ran code of {shown}"
    if outside:
        return f"read without running its code: pickled objects kept as inert placeholders ({shown})"
    return "read without running its code: tensors and plain data only"


@cli
def main(argv=None) -> None:
    args = parser().parse_args(argv)
    bb = load_backbone(args.input, arch=args.arch, allow_pickle=args.allow_pickle)
    # The command holds its output folder's lock while it writes (library callers hold their own).
    report = CONVERTERS[args.format](bb, args.output, verify=not args.no_verify, lock=True)
    print(f"{args.input}: {bb.layout} layout, {bb.arch} ({bb.meta['arch_from']})")
    print(_pickle_line(bb.meta["pickle"]))
    rows = report["rows"] + [(f"output keys ({report['format']})", report["keys"], report["path"])]
    print(tabulate(rows, headers=["", "keys", "example"], tablefmt="simple"))
    for line in report["checks"]:
        print(f"verified: {line}")
    if args.no_verify:
        print("verified: library load skipped (--no-verify)")
    # Nothing returned: the console script passes main's value to sys.exit, and any object
    # but None or 0 there is a failure (a dict was printed to stderr with exit status 1).


if __name__ == "__main__":
    main(sys.argv[1:])
