"""Transfer evaluation of pretrained ResNets: linear probe, kNN, detection,
segmentation, the one-command bench and the comparison report.

Every task writes ``DIR/results.json`` (see ``transfer.results``); ``report``
reads nothing else."""
