"""How far a cache's records stand from full logits for one loss: said once when a student starts.

A record keeps the teacher's top k exactly; what it keeps of the rest (one tail bucket, a tail
code, sampled tail classes) matters in proportion to the teacher's mass outside the top k at the
loss's temperature. This module measures that mass on the records of one stored block and says
what the loss will read (docs/methods.md, "What a record keeps").
"""

from __future__ import annotations

import numpy as np
import torch

from kdcache.losses import LossConfig
from kdcache.record import MIN_CODED_TAIL, checked_shape_error, stored_record

#: Above this median tail mass a record without a tail code or sampled classes earns a warning.
WARN_TAIL_MASS = 0.2
#: Above this much misplaced mass (the median tail mass times the code's shape error on the calibration views)
#: a tail code earns a warning: the teacher's tail is not as low-rank as the code's rank.
WARN_CODE_TV = 0.1


def loss_temperature(loss: LossConfig) -> float | None:
    """The teacher temperature the loss reads the records at (MKD: its starting one); None for ``ce``."""
    if loss.name in ("kd", "mkd"):
        return float(loss.temperature)
    if loss.name in ("ttm", "wttm"):
        return 1.0 / float(loss.gamma)
    return None


def record_fidelity(records: dict, manifest, loss: LossConfig) -> dict | None:
    """What the loss reads from records of one block (``records``: its ``values``, ``indices``, ``tail``), or None for ``ce``.

    ``tail_mass``: quantiles (5%, 50%, 95%) of the teacher's mass outside the top k at the loss's
    temperature; ``reads``: how the tail enters the loss; ``warn``: whether that is far from full logits.
    """
    temperature = loss_temperature(loss)
    if temperature is None:
        return None
    record = stored_record(records["values"], records["indices"].astype(np.int64), records["tail"], manifest)
    k, classes = record.k, record.num_classes
    if k >= classes:
        return {"temperature": temperature, "k": k, "tail_mass": [0.0, 0.0, 0.0], "reads": "every logit", "kept": True,
                "warn": False}
    mass = record.log_probs(temperature)[:, -1].exp()
    quantiles = [float(q) for q in torch.quantile(mass.double(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))]
    kept = bool(record.spec.rank or record.samples)
    estimated = loss.tail == "estimated" and kept
    if estimated:
        parts = [f"its rank-{record.spec.rank} tail code" if record.spec.rank else "",
                 f"{record.samples} sampled tail classes" if record.samples else ""]
        reads = "the tail from " + " and ".join(p for p in parts if p)
    else:
        reads = {"bucket": "the tail as one bucket", "uniform": "the tail spread evenly",
                 "estimated": "the tail as one bucket (the cache has no tail code or sampled classes)"}[loss.tail]
    out = {"temperature": temperature, "k": k, "tail_classes": classes - k, "tail_mass": quantiles, "reads": reads,
           "kept": kept, "warn": bool(not estimated and quantiles[1] > WARN_TAIL_MASS)}
    shape_error = checked_shape_error(manifest.tail, temperature) if estimated and record.spec.rank else None
    if shape_error is not None:  # measured when the cache was made: how well the code shapes this teacher's tail
        out.update(code_shape_error=shape_error, misplaced=quantiles[1] * shape_error)
        out["warn"] = out["warn"] or out["misplaced"] > WARN_CODE_TV
    return out


def teachers_fidelity(block: dict, manifests: dict, loss: LossConfig) -> dict | None:
    """:func:`record_fidelity` of every teacher of a block read with all their records (``block["teachers"]``, in the
    order of ``manifests``: record name -> the manifest its records are read with): ``{"teachers": {name: ...}}``,
    or None for ``ce``. Each teacher's records are read with their own tail spec and basis."""
    found = {name: record_fidelity(records, manifest, loss) for (name, manifest), records in zip(manifests.items(), block["teachers"])}
    return None if all(f is None for f in found.values()) else {"teachers": found}


def describe(fidelity: dict, loss: LossConfig, *, name: str | None = None) -> str:
    """The log line: the tail mass at the loss's temperature and what the loss reads, a warning where that is far off
    (one line per teacher for :func:`teachers_fidelity`'s)."""
    if "teachers" in fidelity:
        return "\n".join(describe(one, loss, name=teacher) for teacher, one in fidelity["teachers"].items())
    low, median, high = fidelity["tail_mass"]
    line = (f"teacher records{'' if name is None else f' {name}'} at the loss's temperature T = {fidelity['temperature']:g}: {100 * median:.0f}% of the teacher's "
            f"mass (5-95%: {100 * low:.0f}-{100 * high:.0f}%) lies outside the stored top {fidelity['k']}; "
            f"loss {loss.name!r} reads {fidelity['reads']}")
    if "misplaced" in fidelity:
        line += (f", whose shape of the tail is off by {100 * fidelity['code_shape_error']:.0f}% (total variation, median "
                 f"over the views the cache was calibrated on): about {100 * fidelity['misplaced']:.0f}% of the target misplaced")
    if fidelity["warn"] and "misplaced" in fidelity:
        return ("warning: " + line + "; this teacher's tail is less low-rank than the code (docs/methods.md, 'What a record "
                "keeps'): make the cache with a larger --tail-rank, or with --topk full")
    if fidelity["warn"]:
        if fidelity.get("kept"):
            fix = "train with --tail estimated, which reads them"
        elif fidelity.get("tail_classes", 0) > MIN_CODED_TAIL:
            fix = "make the cache with precompute-logits' default record (it has a tail code) or with --topk full"
        else:
            fix = f"make the cache with --topk full (every logit: {fidelity['tail_classes']} more per view)"
        line = ("warning: " + line + ", so its gradient is far from the full-logit one (docs/methods.md, 'What a record "
                f"keeps'): {fix}")
    return line
