"""Tables and plots (matplotlib, Agg canvas, no display) for a run or a comparison of runs."""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from debiaslab.fileio import write_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

FIGSIZE_IN = (6.4, 4.0)
DEFAULT_DPI = 100
BAR_GROUP_WIDTH = 0.8
ROTATE_LABELS_ABOVE = 10  # rotate x tick labels when there are more classes than this
CHANNEL_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


# ---------------------------------------------------------------------------- image grids
def _to_numpy(images: Any) -> np.ndarray:
    if hasattr(images, "detach"):  # torch.Tensor, without importing torch here
        images = images.detach().cpu()
        if str(images.dtype) != "torch.uint8":
            images = images.float()
        images = images.numpy()
    return np.asarray(images)


def to_uint8(images: Any) -> np.ndarray:
    """uint8 images unchanged; any other dtype read as [-1, 1] and converted by the one pixel
    rule (data.pixels: the stored samples' bytes)."""
    from debiaslab.data.pixels import to_uint8_numpy

    array = _to_numpy(images)
    if array.dtype == np.uint8:
        return array
    return to_uint8_numpy(array)


def image_grid(
    images: Any, nrow: int = 8, padding: int = 2, pad_value: int = 0, scale: int = 1
) -> np.ndarray:
    """Tile images [N,C,H,W] (or one [C,H,W]) into a uint8 array [H', W', C].

    Floats are read as [-1, 1], uint8 as is. Like torchvision's make_grid: `nrow` images per row,
    `padding` pixels of `pad_value` around and between tiles; `scale` upsamples each pixel
    (nearest neighbour) before tiling, e.g. 4 for 8x8 digits.
    """
    array = to_uint8(images)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[0] == 0:
        raise ValueError(f"expected images [N,C,H,W] with N >= 1, got shape {array.shape}")
    if array.shape[1] not in CHANNEL_MODES:
        raise ValueError(f"expected 1, 3 or 4 channels, got shape {array.shape}")
    if nrow < 1 or padding < 0 or scale < 1:
        raise ValueError(f"need nrow >= 1, padding >= 0, scale >= 1: {nrow}, {padding}, {scale}")
    if scale > 1:
        array = array.repeat(scale, axis=2).repeat(scale, axis=3)
    count, channels, height, width = array.shape
    cols = min(nrow, count)
    rows = math.ceil(count / cols)
    cell_h, cell_w = height + padding, width + padding
    grid = np.full(
        (rows * cell_h + padding, cols * cell_w + padding, channels), pad_value, dtype=np.uint8
    )
    for index in range(count):
        top = (index // cols) * cell_h + padding
        left = (index % cols) * cell_w + padding
        grid[top : top + height, left : left + width] = array[index].transpose(1, 2, 0)
    return grid


def save_image_grid(
    images: Any, path: str | os.PathLike[str], nrow: int = 8, padding: int = 2, scale: int = 1
) -> Path:
    """Write `image_grid(images, ...)` as a PNG at `path` (temp name, then rename)."""
    from PIL import Image

    grid = image_grid(images, nrow=nrow, padding=padding, scale=scale)
    channels = grid.shape[2]
    picture = Image.fromarray(grid[:, :, 0] if channels == 1 else grid, CHANNEL_MODES[channels])
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(target, lambda fh: picture.save(fh, format="PNG"))


# -------------------------------------------------------------------------------- figures
PANEL_SIZE_IN = 4.0


def _new_figure(figsize: tuple[float, float] = FIGSIZE_IN) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DEFAULT_DPI)
    FigureCanvasAgg(fig)  # attaches itself; no pyplot, no global figure registry, no display
    return fig


def _as_count_dict(counts: Mapping[Any, int] | Sequence[int]) -> dict[str, int]:
    if isinstance(counts, Mapping):
        return {str(k): int(v) for k, v in counts.items()}
    return {str(i): int(v) for i, v in enumerate(counts)}


def class_count_figure(
    counts: Mapping[Any, int] | Sequence[int],
    title: str = "class counts",
    log_scale: bool = False,
    second_counts: Mapping[Any, int] | Sequence[int] | None = None,
    labels: tuple[str, str] = ("dataset", "samples"),
) -> Figure:
    """Bar chart of per-class counts (a dict class -> count, or a list indexed by class).

    With `second_counts`, bars stand side by side (e.g. dataset vs generated samples), over the
    union of classes in first-seen order; a class missing from one side counts 0.
    """
    first = _as_count_dict(counts)
    second = _as_count_dict(second_counts) if second_counts is not None else None
    classes = list(first) + [k for k in (second or {}) if k not in first]
    series = [(labels[0], first)] + ([(labels[1], second)] if second is not None else [])
    width = BAR_GROUP_WIDTH / len(series)
    fig = _new_figure()
    ax = fig.add_subplot()
    positions = np.arange(len(classes), dtype=float)
    for offset, (label, values) in enumerate(series):
        shift = (offset - (len(series) - 1) / 2) * width
        heights = [values.get(c, 0) for c in classes]
        ax.bar(positions + shift, heights, width=width, label=label)
    ax.set_xticks(positions)
    ax.set_xticklabels(classes, rotation=90 if len(classes) > ROTATE_LABELS_ABOVE else 0)
    ax.set_xlabel("class")
    ax.set_ylabel("count")
    ax.set_title(title)
    if log_scale:
        ax.set_yscale("log")
    if second is not None:
        ax.legend()
    fig.tight_layout()
    return fig


def shares_figure(series: Mapping[str, Sequence[float]], groups: Sequence[str],
                  title: str = "", xlabel: str = "subgroup") -> Figure:
    """Proportions of several populations side by side, one bar group per subgroup (e.g. the
    biased set, the reference set and the samples)."""
    width = BAR_GROUP_WIDTH / max(len(series), 1)
    fig = _new_figure()
    ax = fig.add_subplot()
    positions = np.arange(len(groups), dtype=float)
    for offset, (label, values) in enumerate(series.items()):
        shift = (offset - (len(series) - 1) / 2) * width
        ax.bar(positions + shift, list(values), width=width, label=label)
    ax.set_xticks(positions)
    ax.set_xticklabels(list(groups), rotation=90 if len(groups) > ROTATE_LABELS_ABOVE else 0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("proportion")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def image_panels_figure(panels: Mapping[str, Any], title: str = "", columns: int = 2) -> Figure:
    """Several image grids side by side, each titled (e.g. model x sampler in the quickstart).

    `panels` maps a title to an image or grid (uint8 HxWxC, or anything `image_grid` accepts).
    """
    if not panels:
        raise ValueError("image_panels_figure needs at least one panel")
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    fig = _new_figure((PANEL_SIZE_IN * columns, PANEL_SIZE_IN * rows + 0.4))
    for i, (name, image) in enumerate(panels.items()):
        arr = np.asarray(image)
        if not (arr.ndim == 3 and arr.dtype == np.uint8 and arr.shape[-1] in (1, 3, 4)):
            arr = image_grid(image)
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.imshow(arr[..., 0] if arr.shape[-1] == 1 else arr, cmap="gray", vmin=0, vmax=255,
                  interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def loss_curve_figure(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str = "training loss",
    log_scale: bool = False,
    xlabel: str = "step",
    ylabel: str = "loss",
) -> Figure:
    """Line plot of named curves, each `(steps, values)`."""
    fig = _new_figure()
    ax = fig.add_subplot()
    for name, (steps, values) in curves.items():
        ax.plot(np.asarray(steps, dtype=float), np.asarray(values, dtype=float), label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_scale:
        ax.set_yscale("log")
    if curves:
        ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | os.PathLike[str], dpi: int = DEFAULT_DPI) -> Path:
    """Save `fig` at `path` (format from the suffix, default PNG) via a temp name and a rename."""
    target = Path(path)
    fmt = target.suffix.lstrip(".").lower() or "png"
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, lambda fh: fig.savefig(fh, format=fmt, dpi=dpi))
    return target


# --------------------------------------------------------------------------------- tables
def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Number) and not isinstance(value, bool)


def _cell(value: Any, floatfmt: str) -> str:
    if value is None:
        return ""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return str(int(value))
    if _is_number(value):
        return format(float(value), floatfmt)
    return str(value).replace("\n", " ")


def _columns(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None) -> list[str]:
    if columns is not None:
        return list(columns)
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def _table_cells(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None, floatfmt: str
) -> tuple[list[str], list[list[str]], list[bool]]:
    names = _columns(rows, columns)
    cells = [[_cell(row.get(name), floatfmt) for name in names] for row in rows]
    numeric = [
        any(row.get(n) is not None for row in rows)
        and all(row.get(n) is None or _is_number(row.get(n)) for row in rows)
        for n in names
    ]
    return names, cells, numeric


def format_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, floatfmt: str = ".4g"
) -> str:
    """Plain-text table: header, dashes, rows; two spaces between columns, numbers right-aligned.

    `columns` picks and orders the columns (default: keys in first-seen order); missing cells and
    None are blank; floats use `floatfmt`.
    """
    names, cells, numeric = _table_cells(rows, columns, floatfmt)
    widths = [max([len(n)] + [len(r[i]) for r in cells]) for i, n in enumerate(names)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)
        ]
        return "  ".join(parts).rstrip()

    lines = [line(names), line(["-" * w for w in widths])] + [line(r) for r in cells]
    return "\n".join(lines)


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, floatfmt: str = ".4g"
) -> str:
    """GitHub-flavoured Markdown table, padded to align in plain text; numbers right-aligned."""
    names, cells, numeric = _table_cells(rows, columns, floatfmt)
    names = [n.replace("|", "\\|") for n in names]
    cells = [[c.replace("|", "\\|") for c in r] for r in cells]
    widths = [max([3, len(n)] + [len(r[i]) for r in cells]) for i, n in enumerate(names)]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)
        ]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(
        "-" * (w + 1) + ":" if num else "-" * (w + 2) for w, num in zip(widths, numeric)
    ) + "|"
    return "\n".join([line(names), rule] + [line(r) for r in cells])


# -------------------------------------------------------------------------------- evaluation
HEAD_COLOR, TAIL_COLOR = "tab:blue", "tab:orange"


def per_class_figure(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = ("fid", "recall"),
                     title: str = "") -> Figure:
    """Per-class bars with bootstrap confidence intervals, head and tail classes coloured.

    Rows carry ``class``, ``group`` ('head'/'tail'), ``<metric>`` and ``<metric>_ci`` ([lo, hi]
    or None); a metric that is None for a class (too few samples) is left blank.
    """
    fig = _new_figure((max(6.0, 0.5 * len(rows) * len(metrics)), 3.2 * len(metrics)))
    names = [str(r["class"]) for r in rows]
    x = np.arange(len(rows), dtype=float)
    colors = [HEAD_COLOR if r.get("group") == "head" else TAIL_COLOR for r in rows]
    for i, metric in enumerate(metrics):
        ax = fig.add_subplot(len(metrics), 1, i + 1)
        vals = [r.get(metric) for r in rows]
        heights = [v if v is not None else 0.0 for v in vals]
        err = np.zeros((2, len(rows)))
        for j, r in enumerate(rows):
            ci = r.get(f"{metric}_ci")
            if ci is not None and vals[j] is not None:
                err[:, j] = [max(vals[j] - ci[0], 0.0), max(ci[1] - vals[j], 0.0)]
        ax.bar(x, heights, color=colors, yerr=err, capsize=3)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=90 if len(names) > ROTATE_LABELS_ABOVE else 0)
        ax.set_ylabel(metric)
        if i == 0:
            from matplotlib.patches import Patch

            ax.legend(handles=[Patch(color=HEAD_COLOR, label="head"),
                               Patch(color=TAIL_COLOR, label="tail")], fontsize=8)
            if title:
                ax.set_title(title)
    fig.tight_layout()
    return fig


def distribution_figure(distributions: Mapping[str, Mapping[str, float]], title: str = ""
                        ) -> Figure:
    """One panel per attribute: the samples' proportions against the uniform target."""
    n = len(distributions)
    fig = _new_figure((3.2 * max(n, 1), 3.0))
    for i, (name, dist) in enumerate(distributions.items()):
        ax = fig.add_subplot(1, n, i + 1)
        keys = list(dist)
        ax.bar(range(len(keys)), [dist[k] for k in keys])
        ax.axhline(1.0 / len(keys), color="black", linestyle="--", linewidth=1, label="uniform")
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels(keys, rotation=90 if len(keys) > ROTATE_LABELS_ABOVE else 0)
        ax.set_ylim(0, 1)
        ax.set_title(name, fontsize=10)
        if i == 0:
            ax.set_ylabel("proportion of samples")
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def evaluation_figures(ev: Any, title: str = "") -> dict[str, Figure]:
    """The plots of an :class:`~debiaslab.metrics.evaluate.Evaluation` worth looking at."""
    figures = {}
    if ev.per_class:
        figures["per_class"] = per_class_figure(ev.per_class, title=title)
    if ev.distributions:
        figures["distribution"] = distribution_figure(ev.distributions, title=title)
    return figures
