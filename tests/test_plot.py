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
