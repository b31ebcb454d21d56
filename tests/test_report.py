"""Tests of debiaslab.report: exact grid pixels, PNG files, figures and golden table strings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.utils import make_grid

from debiaslab.report import (
    class_count_figure,
    format_table,
    image_grid,
    loss_curve_figure,
    markdown_table,
    save_figure,
    save_image_grid,
    to_uint8,
)

ROWS = [
    {"method": "baseline", "fid": 12.3456, "recall": 0.5, "n": 1000},
    {"method": "cbdm", "fid": 9.87, "recall": None, "n": 50},
]
COLUMNS = ["method", "fid", "recall", "n"]


def test_to_uint8_maps_minus_one_one_to_0_255_and_keeps_uint8() -> None:
    x = np.array([-1.0, -2.0, 0.0, 0.5, 1.0, 3.0, np.nan], dtype=np.float32)
    assert to_uint8(x).tolist() == [0, 0, 128, 191, 255, 255, 0]
    u = np.array([0, 7, 255], dtype=np.uint8)
    assert to_uint8(u) is u


def test_image_grid_exact_pixels() -> None:
    images = np.array(
        [[[[-1.0, 0.0], [1.0, 0.5]]], [[[1.0, 1.0], [1.0, 1.0]]]], dtype=np.float32
    )  # [N=2, C=1, H=2, W=2]
    grid = image_grid(images, nrow=2, padding=1)
    expected = np.array(
        [
            [0, 0, 0, 0, 0, 0, 0],
            [0, 0, 128, 0, 255, 255, 0],
            [0, 255, 191, 0, 255, 255, 0],
            [0, 0, 0, 0, 0, 0, 0],
        ],
        dtype=np.uint8,
    )[:, :, None]
    assert grid.dtype == np.uint8
    assert grid.shape == (4, 7, 1)
    np.testing.assert_array_equal(grid, expected)


def test_image_grid_layout_scale_and_tensor_input() -> None:
    images = torch.zeros(3, 1, 2, 2)  # value 0.0 -> 128
    grid = image_grid(images, nrow=2, padding=0, pad_value=9, scale=2)
    assert grid.shape == (8, 8, 1)
    assert (grid[:4, :] == 128).all() and (grid[4:, :4] == 128).all()
    assert (grid[4:, 4:] == 9).all()  # the empty fourth cell keeps the pad value
    single = image_grid(torch.ones(3, 2, 5), padding=0)  # one [C,H,W] image
    assert single.shape == (2, 5, 3) and (single == 255).all()


@pytest.mark.parametrize("nrow,padding", [(3, 2), (8, 0), (2, 1)])
def test_image_grid_matches_torchvision_make_grid(nrow: int, padding: int) -> None:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (7, 3, 5, 4), generator=generator, dtype=torch.uint8)
    ours = image_grid(images, nrow=nrow, padding=padding)
    reference = make_grid(images, nrow=nrow, padding=padding).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(ours, reference)


def test_image_grid_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="channels"):
        image_grid(np.zeros((2, 2, 4, 4)))
    with pytest.raises(ValueError, match="N,C,H,W"):
        image_grid(np.zeros((4, 4)))


@pytest.mark.parametrize("channels,mode", [(1, "L"), (3, "RGB")])
def test_save_image_grid_png_readable(tmp_path, channels: int, mode: str) -> None:
    images = np.linspace(-1, 1, 4 * channels * 3 * 3, dtype=np.float32).reshape(4, channels, 3, 3)
    path = save_image_grid(images, tmp_path / "sub" / "grid.png", nrow=2)
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.mode == mode
        pixels = np.asarray(picture)
    expected = image_grid(images, nrow=2)
    np.testing.assert_array_equal(pixels.reshape(expected.shape), expected)
    assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]  # no temp left


def test_class_count_figure_side_by_side_and_saved(tmp_path) -> None:
    fig = class_count_figure(
        {"0": 500, "1": 50, "2": 5}, "digits LT", log_scale=True,
        second_counts={"0": 300, "1": 100, "3": 10},
    )
    ax = fig.axes[0]
    heights = [patch.get_height() for patch in ax.patches]
    assert heights == [500, 50, 5, 0, 300, 100, 0, 10]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3"]
    assert ax.get_yscale() == "log" and ax.get_title() == "digits LT"
    assert ax.get_legend() is not None
    path = save_figure(fig, tmp_path / "counts.png")
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.size == (640, 400)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counts.png"]


def test_class_count_figure_from_list() -> None:
    fig = class_count_figure([3, 1, 2], "counts")
    ax = fig.axes[0]
    assert [patch.get_height() for patch in ax.patches] == [3, 1, 2]
    assert ax.get_yscale() == "linear" and ax.get_legend() is None


def test_loss_curve_figure_saved_as_svg(tmp_path) -> None:
    fig = loss_curve_figure({"cbdm": ([0, 1, 2], [1.0, 0.5, 0.25]), "base": ([0, 2], [1, 0.7])})
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["cbdm", "base"]
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [1.0, 0.5, 0.25])
    path = save_figure(fig, tmp_path / "loss.svg")
    assert path.read_text().lstrip().startswith("<?xml")


def test_format_table_golden() -> None:
    assert format_table(ROWS, COLUMNS) == (
        "method      fid  recall     n\n"
        "--------  -----  ------  ----\n"
        "baseline  12.35     0.5  1000\n"
        "cbdm       9.87            50"
    )


def test_format_table_default_columns_and_selection() -> None:
    rows = [{"a": "x", "b": 1}, {"c": True}]
    assert format_table(rows) == "a  b  c\n-  -  ----\nx  1\n      True"
    assert format_table(ROWS, ["n", "method"]) == (
        "   n  method\n----  --------\n1000  baseline\n  50  cbdm"
    )


def test_markdown_table_golden() -> None:
    assert markdown_table(ROWS, COLUMNS) == (
        "| method   |   fid | recall |    n |\n"
        "|----------|------:|-------:|-----:|\n"
        "| baseline | 12.35 |    0.5 | 1000 |\n"
        "| cbdm     |  9.87 |        |   50 |"
    )
    assert markdown_table([{"a|b": "x|y"}]) == "| a\\|b |\n|------|\n| x\\|y |"


def test_image_panels_figure_saves_png(tmp_path):
    import numpy as np
    from PIL import Image

    from debiaslab.report import image_panels_figure, save_figure

    grid = np.zeros((20, 30, 1), dtype=np.uint8)
    grid[:, 15:] = 255
    fig = image_panels_figure({"a": grid, "b": np.full((1, 1, 4, 4), 0.5)}, title="t")
    assert len(fig.axes) == 2 and fig.axes[0].get_title() == "a"
    path = save_figure(fig, tmp_path / "p.png")
    assert Image.open(path).size[0] > 100
    import pytest

    with pytest.raises(ValueError):
        image_panels_figure({})
