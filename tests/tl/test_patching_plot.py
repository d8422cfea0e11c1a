"""The patching heatmap says what it shows: token strings on the position axis, a colour bar labelled with the
normalisation, a colour range that holds every value (nothing clipped), and a size that reads as a figure."""

import matplotlib
import pytest
import torch

import lens_det
from lens_det.patching import PatchingResult, logit_diff, patch_sweep

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def sweep():
    model = lens_det.from_config("tiny-gemma2", seed=0)  # character tokenizer: one token per character
    clean, _ = model.to_tokens("When Mary and John went out")
    corrupted, _ = model.to_tokens("When John and Mary went out")
    return model, patch_sweep(model, clean, corrupted, logit_diff(model.to_single_token("M"),
                                                                  model.to_single_token("J")))


def test_position_axis_shows_the_clean_tokens_and_marks_where_the_corrupted_differs(sweep):
    model, result = sweep
    assert result.clean_str_tokens == model.to_str_tokens("When Mary and John went out")
    assert result.corrupted_str_tokens == model.to_str_tokens("When John and Mary went out")
    ax = result.plot().axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == [t.replace(" ", "\u2423") for t in result.clean_str_tokens]  # spaces made visible
    bold = [t.get_text() for t in ax.get_xticklabels() if t.get_fontweight() == "bold"]
    assert bold == list("MaryJohn")  # exactly the positions where the two prompts differ


def test_colour_bar_is_labelled_and_the_range_holds_every_value(sweep):
    _, result = sweep
    values = result.values.clone()
    values[1, 3] = 1.7  # an overshoot past the clean run, and one below -1
    values[2, 4] = -2.5
    values[3, 0] = float("nan")  # a head or hook the layer lacks
    fig = PatchingResult(values, result.raw, "pos", result.hook, result.clean_metric, result.corrupted_metric,
                         result.clean_str_tokens, result.corrupted_str_tokens).plot()
    image = fig.axes[0].images[0]
    assert image.norm.vmin == -2.5 and image.norm.vmax == 2.5  # symmetric, from the data: nothing clipped
    bar_label = fig.axes[1].get_ylabel()
    assert "0 = corrupted" in bar_label and "1 = clean" in bar_label
    title = fig.axes[0].get_title()
    assert f"{result.clean_metric:.4g}" in title and f"{result.corrupted_metric:.4g}" in title  # the raw span
    assert "grey: this layer has no such head or hook" in title


def test_figure_size_reads_for_many_positions(sweep, tmp_path):
    _, result = sweep
    n_layers = 4
    wide = PatchingResult(torch.zeros(n_layers, 50), torch.zeros(n_layers, 50), "pos", "hook_resid_pre", 1.0, 0.0)
    path = tmp_path / "p.png"
    wide.plot(path)
    width, height = matplotlib.image.imread(path).shape[1::-1]
    assert width <= 1300 and 350 <= height <= 750, (width, height)  # not a 2044 x 326 strip
