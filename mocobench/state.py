"""The one comparison of two state dicts, used wherever weights must be exactly what we think.

Converters check the file they wrote against the backbone they read, verification checks
what Detectron2 or MMSegmentation actually loaded, the loader checks a backbone against
torchvision's shapes: each is ``compare_state(got, expected)`` and, when it must hold,
``.refuse_unless_equal(where)``.
"""
from dataclasses import dataclass, field


@dataclass
class StateDiff:
    """How `got` differs from `expected` (key lists keep `expected`'s, then `got`'s, order).

    missing      in expected, not in got (in a loaded model: would stay at its initialisation)
    unexpected   in got, not in expected (in a file: nobody reads them)
    wrong_shape  in both, shapes differ
    differ       in both, same shape, different values (only when values are compared)
    checked      keys compared
    """
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    wrong_shape: list = field(default_factory=list)
    differ: list = field(default_factory=list)
    checked: int = 0

    @property
    def equal(self) -> bool:
        return not (self.missing or self.unexpected or self.wrong_shape or self.differ)

    def refuse_unless_equal(self, where: str, then: str = "refusing it") -> None:
        """UserError, one line, naming the first kind of difference found."""
        from mocobench.errors import UserError

        for label, bad in (("is missing", self.missing), ("has unexpected", self.unexpected),
                           ("has wrong shapes for", self.wrong_shape),
                           ("has different values for", self.differ)):
            if bad:
                shown = ", ".join(bad[:3]) + (" ..." if len(bad) > 3 else "")
                raise UserError(f"{where} {label} {len(bad)} key(s): {shown}; {then}")


def _shape(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else tuple(v.shape)


def compare_state(got: dict, expected: dict, *, values: bool = True,
                  skip_counters: bool = False) -> StateDiff:
    """Compare two {name: tensor or array} dicts. `expected` may instead map names to shapes
    (then only keys and shapes are compared). values=True also compares every value exactly
    (after casting `expected`'s to `got`'s dtype). skip_counters ignores BN
    ``num_batches_tracked`` entries, which carry no learned value (Detectron2 files have none)."""
    import torch

    def keep(d):
        return {k: v for k, v in d.items()
                if not (skip_counters and k.endswith("num_batches_tracked"))}

    got, expected = keep(got), keep(expected)
    diff = StateDiff(missing=[k for k in expected if k not in got],
                     unexpected=[k for k in got if k not in expected])
    for k in expected:
        if k not in got:
            continue
        diff.checked += 1
        if _shape(got[k]) != _shape(expected[k]):
            diff.wrong_shape.append(k)
        elif values and not isinstance(expected[k], (tuple, list)):
            a = torch.as_tensor(got[k]).detach().cpu()
            b = torch.as_tensor(expected[k]).detach().cpu().to(a.dtype)
            if not torch.equal(a, b):
                diff.differ.append(k)
    return diff
