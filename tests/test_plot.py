"""The one plotting helper of the run plots and the evaluation plots (launch/plot.py)."""

import matplotlib.pyplot as plt

from longnet.launch.plot import curves


def test_ticks_are_the_measured_lengths_and_values_fit_under_the_title():
    figure, axes = plt.subplots()
    points = [(256, 2.59), (384, 2.57), (512, 2.55), (600, 2.54)]
    curves(axes, {"validation": points}, "log", "context", "bits per byte", "title")
    figure.canvas.draw()
    labels = [t.get_text() for t in axes.get_xticklabels()]
    assert labels == ["256", "384", "512", "600"]  # not 3x10^2, 4x10^2, 6x10^2
    assert axes.get_xaxis().get_minor_ticks() == []
    low, high = axes.get_ylim()
    assert low == 0 and high >= 1.15 * 2.59  # room for the printed values below the title
    assert [t.get_text() for t in axes.texts] == ["2.590", "2.570", "2.550", "2.540"]
    plt.close(figure)


def test_evaluation_plots_are_drawn(tmp_path):
    from longnet.launch.plot import plot_evaluation

    results = {
        "perplexity": {"256": {"bits_per_byte": 2.6}, "512": {"bits_per_byte": 2.5}},
        "positions": [{"start": 0, "loss": 2.0}, {"start": 64, "loss": 1.9}],
        "copy": [{"distance": 64, "loss": 5.0}, {"distance": 128, "loss": 5.5}],
        "passkey": [{"context": 256, "depth": 0.0, "accuracy": 1.0}],
    }
    written = plot_evaluation({"a": results, "b": results}, tmp_path, "x-")
    names = sorted(path.name for path in written)
    assert names == ["x-copy.png", "x-passkey.png", "x-perplexity.png", "x-positions.png"]
    assert all(path.stat().st_size > 0 for path in written)
