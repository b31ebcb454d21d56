"""A classifier's logits on noisy images or features, and its validation per timestep bucket
(accuracy and cross-entropy on fixed draws), with the plot."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from debiaslab.diffusion.schedules import VPSchedule
from debiaslab.training.classifier_data import INPUT_FEATURES, INPUT_IMAGES, ClassifierData

EVAL_BATCH = 256  # rows per forward pass in evaluate_classifier
_EVAL_SEED_STRIDE = 1_000_003


def classifier_logits(model: nn.Module, x: Tensor, *, t: Tensor | None = None,
                      noise: Tensor | None = None, schedule: VPSchedule | None = None,
                      y: Tensor | None = None) -> Tensor:
    """Logits of ``model``: on x_t = sqrt(abar_t) x + sqrt(1 - abar_t) noise when ``noise`` is
    given (noisy images), else on ``x`` (features), at float timesteps t (if any)."""
    if noise is not None:
        if schedule is None or t is None:
            raise ValueError("noisy inputs need the timesteps t and the schedule")
        a, s = schedule.alpha_sigma(t, x)
        x = a * x + s * noise
    args = () if t is None else (t.to(x.device, torch.float32),)
    return model(x, *args, **({} if y is None else {"y": y}))



def bucket_edges(lo: int, hi: int, buckets: int) -> list[int]:
    """Integer edges of ``buckets`` equal-width buckets over lo..hi: bucket b is
    edges[b]..edges[b+1]-1 (fewer buckets when the range is narrower than ``buckets``)."""
    width = hi - lo + 1
    buckets = max(1, min(buckets, width))
    return [lo + (width * b) // buckets for b in range(buckets + 1)]


@torch.no_grad()
def evaluate_classifier(model: nn.Module, data: ClassifierData, *, schedule: VPSchedule,
                        buckets: int, seed: int, timestep_range: tuple[int, int] | None = None,
                        device: str | torch.device | None = None) -> dict[str, Any]:
    """Accuracy and mean cross-entropy per timestep bucket (equal-width buckets over the
    timestep range, default 0..T-1), deterministic.

    Noisy images: every row is scored once in every bucket, at a timestep drawn uniformly from
    the bucket and with noise, both from the row's own generator (seed, row index). Features with
    timesteps: rows fall into the bucket of their timestep; without: one bucket of all rows.
    Returns lists ``t_lo``, ``t_hi``, ``accuracy``, ``loss``, ``count`` and the means
    ``accuracy_mean``, ``loss_mean`` over all scored rows (NaN where nothing was scored).
    """
    lo, hi = timestep_range or (0, schedule.num_timesteps - 1)
    time_free = data.kind == INPUT_FEATURES and data.timesteps is None
    edges = [lo, hi + 1] if time_free else bucket_edges(lo, hi, buckets)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    n, nb = len(data), len(edges) - 1
    correct, loss_sum, count = np.zeros(nb), np.zeros(nb), np.zeros(nb, dtype=np.int64)
    if data.kind == INPUT_IMAGES and n:
        for b in range(nb):
            for s in range(0, n, EVAL_BATCH):
                idx = torch.arange(s, min(s + EVAL_BATCH, n))
                t, noise = _eval_draws(data, idx, b, edges, seed)
                y = (data.cond[idx].to(device) if data.cond is not None and _conditional(model)
                     else None)
                logits = classifier_logits(model, data.float_inputs(idx).to(device),
                                           t=t.to(device), noise=noise.to(device),
                                           schedule=schedule, y=y)
                _accumulate(logits, data.labels[idx], b, correct, loss_sum, count)
    elif n:
        if time_free:
            which = torch.zeros(n, dtype=torch.long)
        else:
            cuts = torch.tensor(edges[1:-1], dtype=torch.float32)
            which = torch.bucketize(data.timesteps, cuts, right=True)
        for s in range(0, n, EVAL_BATCH):
            idx = torch.arange(s, min(s + EVAL_BATCH, n))
            t = None if data.timesteps is None else data.timesteps[idx].to(device)
            logits = classifier_logits(model, data.float_inputs(idx).to(device), t=t)
            for b in which[idx].unique().tolist():
                mask = which[idx] == b
                _accumulate(logits[mask.to(logits.device)], data.labels[idx][mask], b, correct,
                            loss_sum, count)
    model.train(was_training)
    with np.errstate(invalid="ignore", divide="ignore"):  # empty buckets: NaN
        return {
            "t_lo": edges[:-1], "t_hi": [e - 1 for e in edges[1:]],
            "accuracy": (correct / count).tolist(), "loss": (loss_sum / count).tolist(),
            "count": count.tolist(), "accuracy_mean": float(correct.sum() / count.sum()),
            "loss_mean": float(loss_sum.sum() / count.sum()),
        }


def _eval_draws(data: ClassifierData, idx: Tensor, bucket: int, edges: list[int], seed: int
                ) -> tuple[Tensor, Tensor]:
    """Timesteps (uniform in the bucket) and noise of rows ``idx`` in ``bucket``, each from the
    generator of (seed, row, bucket): the same whatever the batching or the other rows."""
    nb = len(edges) - 1
    lo, width = edges[bucket], edges[bucket + 1] - edges[bucket]
    t = torch.empty(len(idx), dtype=torch.long)
    noise = torch.empty((len(idx),) + data.shape)
    for i, row in enumerate(data.rows[idx].tolist()):
        g = torch.Generator().manual_seed((seed * _EVAL_SEED_STRIDE + row) * nb + bucket)
        t[i] = lo + int(torch.randint(0, width, (1,), generator=g))
        noise[i] = torch.randn(data.shape, generator=g)
    return t, noise


def _conditional(model: nn.Module) -> bool:
    return getattr(model, "num_classes_cond", None) is not None


def _accumulate(logits: Tensor, labels: Tensor, bucket: int, correct: np.ndarray,
                loss_sum: np.ndarray, count: np.ndarray) -> None:
    logits = logits.float().cpu()
    correct[bucket] += float((logits.argmax(1) == labels).sum())
    loss_sum[bucket] += float(F.cross_entropy(logits, labels, reduction="sum"))
    count[bucket] += len(labels)


def evaluation_metrics(evaluation: dict[str, Any], prefix: str = "val") -> dict[str, float]:
    """Flat MLflow metrics of an evaluation: ``val/accuracy``, ``val/loss`` and per bucket
    ``val/accuracy_t<lo>-<hi>``, ``val/loss_t<lo>-<hi>``."""
    out = {f"{prefix}/accuracy": evaluation["accuracy_mean"],
           f"{prefix}/loss": evaluation["loss_mean"]}
    for lo, hi, acc, loss in zip(evaluation["t_lo"], evaluation["t_hi"],
                                 evaluation["accuracy"], evaluation["loss"]):
        out[f"{prefix}/accuracy_t{lo}-{hi}"] = acc
        out[f"{prefix}/loss_t{lo}-{hi}"] = loss
    return out


def plot_classifier_evaluation(evaluation: dict[str, Any], title: str = "") -> Any:
    """A matplotlib Figure of validation accuracy (left axis) and cross-entropy (right axis) per
    timestep bucket, with a line per label when the evaluation has ``accuracy_by`` (no pyplot
    state: save it with ``fig.savefig``)."""
    from matplotlib.figure import Figure

    mid = [(lo + hi) / 2 for lo, hi in zip(evaluation["t_lo"], evaluation["t_hi"])]
    fig = Figure(figsize=(6.0, 3.5), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(mid, evaluation["accuracy"], "o-", color="tab:blue", label="accuracy")
    by = evaluation.get("accuracy_by") or {}
    if len(by) > 1:  # several labels (e.g. per-attribute heads): one thin line each
        for name, values in by.items():
            ax.plot(mid, values, "-", lw=0.8, alpha=0.7, label=name)
        ax.legend(loc="lower left", fontsize=7)
    ax.set_xlabel("timestep t (bucket centre)")
    ax.set_ylabel("validation accuracy", color="tab:blue")
    ax.set_ylim(0.0, 1.02)
    ax2 = ax.twinx()
    ax2.plot(mid, evaluation["loss"], "s--", color="tab:red", label="cross-entropy")
    ax2.set_ylabel("validation cross-entropy", color="tab:red")
    ax.set_title(title or "classifier validation per timestep bucket")
    return fig


