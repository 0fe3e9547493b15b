"""python -m transfer {linear,knn,svm,lowshot,fewshot,finetune,detect,segment,bench,report} ...

Each task lives in its own module with a ``main(argv)``; importing it lazily
keeps optional engines (Detectron2, MMSegmentation) out of the other tasks.
"""
import importlib
import sys

TASKS = {
    "linear": ("transfer.linear", "linear probe of a frozen backbone (fast or paper protocol)"),
    "knn": ("transfer.linear", "weighted kNN on frozen features"),
    "svm": ("transfer.svm", "per-class linear SVMs, costs cross-validated (VOC07 SVM benchmark)"),
    "lowshot": ("transfer.svm", "low-shot linear SVMs: k per class, seeded samples, mean +- std"),
    "fewshot": ("transfer.fewshot", "N-way K-shot episodes on frozen features, mean and 95% CI"),
    "finetune": ("transfer.finetune", "full fine-tuning; semi-supervised 1% / 10% label subsets"),
    "detect": ("transfer.detect", "detection fine-tuning (Detectron2 or torchvision)"),
    "segment": ("transfer.segment", "semantic segmentation fine-tuning (MMSegmentation)"),
    "bench": ("transfer.bench", "pretrain -> convert -> every transfer task -> report"),
    "report": ("transfer.report", "comparison tables from results.json files"),
}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in TASKS:
        lines = [f"  {name:8s} {help}" for name, (_, help) in TASKS.items()]
        print("usage: python -m transfer TASK [args...]\n\ntasks:\n" + "\n".join(lines))
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    task = argv.pop(0)
    module = importlib.import_module(TASKS[task][0])
    entry = getattr(module, f"main_{task}", None) or module.main
    entry(argv)


if __name__ == "__main__":
    main()
