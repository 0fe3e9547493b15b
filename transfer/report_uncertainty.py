"""The test-set intervals of one table: every run's outcomes, paired, redrawn together.

For a table (one protocol) this reads each run's per-example outcomes
(transfer/outcomes.py: read), pairs every run with one reference run (the baseline's first
run when it has outcomes) by test image (transfer/uncertainty.py: align), checks that
scoring the outcomes once, with no redraw, gives back the metric the run reported, and then
evaluates every run on the SAME redraws of the test images. A row of several runs is the
mean of its runs in each redraw; a delta is row minus baseline in each redraw (paired).
"""
import math

import numpy as np

from transfer import outcomes as outcome_files
from transfer.results import canonical_metric as _canonical
from transfer.uncertainty import CONFIDENCE, IDENTITY_TOLERANCE, align, percentile_ci, resamples


class TableBootstrap:
    """Bootstrap samples per (row label, metric) for the rows of one table."""

    def __init__(self, rows, baseline, metrics, samples: int, seed: int):
        self.samples, self.seed, self.notes = samples, seed, []
        self.n_images = None
        self._row_samples = {}
        runs = self._usable_runs(rows, baseline, metrics)
        if runs:
            per_run = self._draw(runs)
            self._collect(rows, runs, per_run, metrics)

    # -- which runs can be redrawn, and how they pair
    def _usable_runs(self, rows, baseline, metrics):
        """[(row label, run index, evaluator, positions, names)] of runs whose outcomes pair
        with the reference and reproduce their reported metrics."""
        loaded, without = [], []
        for row in rows:
            for i, run in enumerate(row.runs):
                ev = outcome_files.read(run["_path"], run)
                (loaded if ev is not None else without).append((row, i, run, ev))
        if without:
            self.notes.append("no per-example outcomes (no interval; re-run with this version): "
                              + ", ".join(sorted({row.label for row, *_ in without})))
        if not loaded:
            return []
        ref_first = sorted(loaded, key=lambda x: x[0] is not baseline)
        ref_row, _, _, ref = ref_first[0]
        self.n_images = len(ref.keys)
        usable = []
        for row, i, run, ev in loaded:
            pos = align(ref, ev)
            if pos is None:
                self.notes.append(f"{row.label}: its outcomes are not of the same test images (or "
                                  f"ground truth) as {ref_row.label}'s; no paired interval")
                continue
            names = self._reproduced(row, run, ev, pos, metrics)
            if names:  # pos None: the reference's own order, no copy per redraw
                usable.append((row.label, i, ev, None if np.array_equal(pos, np.arange(len(pos))) else pos,
                               names))
        return usable

    def _reproduced(self, row, run, ev, pos, metrics) -> dict:
        """The metrics whose identity redraw equals the reported value (others noted)."""
        reported = {_canonical(k): v for k, v in run["metrics"].items()}
        definitions = {_canonical(k): v for k, v in run["protocol"].get("metric", {}).items()}
        wanted = {m: definitions.get(m, "") for m in metrics if reported.get(m) is not None}
        names = ev.names(wanted)
        if not names:
            return {}
        identity = ev.evaluate(np.ones((1, len(pos))), names)
        kept = {}
        for m, kind in names.items():
            got, want = float(identity[m][0]), float(reported[m])
            if math.isfinite(got) and abs(got - want) <= IDENTITY_TOLERANCE:
                kept[m] = kind
            else:
                self.notes.append(f"{row.label} (seed {run['seed']}): its outcomes give {m} "
                                  f"{got:.3f}, results.json {want:.3f}; no interval for {m} "
                                  "(the outcomes are not what was scored: re-run that task)")
        return kept

    # -- the redraws
    def _draw(self, runs) -> dict:
        per_run = {(label, i): {m: [] for m in names} for label, i, _, _, names in runs}
        for w in resamples(self.n_images, self.samples, self.seed):
            for label, i, ev, pos, names in runs:
                mine = w if pos is None else w[:, pos]
                for m, v in ev.evaluate(mine, names).items():
                    per_run[(label, i)][m].append(v)
        return {key: {m: np.concatenate(v) for m, v in ms.items()} for key, ms in per_run.items()}

    def _collect(self, rows, runs, per_run, metrics):
        for row in rows:
            for m in metrics:
                got = [per_run.get((row.label, i), {}).get(m) for i in range(len(row.runs))]
                if got and all(g is not None for g in got):
                    self._row_samples[(row.label, m)] = np.mean(np.stack(got), axis=0)
                elif any(g is not None for g in got):
                    self.notes.append(f"{row.label}: {m} redrawn for {sum(g is not None for g in got)}"
                                      f" of {len(got)} runs only; no interval")

    # -- what the table shows
    def ci(self, row, metric):
        s = self._row_samples.get((row.label, metric))
        return None if s is None else percentile_ci(s)

    def delta_ci(self, row, base, metric):
        a, b = self._row_samples.get((row.label, metric)), self._row_samples.get((base.label, metric))
        return None if a is None or b is None else percentile_ci(a - b)

    def describe(self) -> str | None:
        if not self._row_samples:
            return None
        return (f"[lo, hi]: {CONFIDENCE:.0%} CI over {self.samples} bootstrap redraws of the "
                f"{self.n_images} test images (test-set sampling only; seed {self.seed}); a delta's "
                "interval is paired: both rows on the same redraws")
