"""The routing table and heatmap a WeMoE job logs: the numbers it was given, legibly drawn."""

from __future__ import annotations

import csv

import matplotlib.pyplot as plt
import numpy as np

from harness.plots import routing_csv, routing_figure

ROUTING = {"experts": ["mnist", "fashion"], "layers": 4,
           "mean_weight": {"mnist": [[0.35, 0.23], [0.34, 0.24], [0.36, 0.22], [0.125, 0.5]],
                           "fashion": [[0.25, 0.33], [0.24, 0.34], [0.2, 0.4], [0.0, 0.75]]}}


def test_routing_csv_holds_every_mean_weight(tmp_path):
    with open(routing_csv(ROUTING, tmp_path / "routing.csv")) as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 4 * 2
    for r in rows:
        want = ROUTING["mean_weight"][r["data_task"]][int(r["layer"])][ROUTING["experts"].index(r["expert"])]
        assert float(r["mean_weight"]) == want


def test_routing_csv_reads_back_as_the_routing_it_was_written_from(tmp_path):
    """``harness report`` rebuilds a WeMoE row's routing from the logged CSV: task x layer x
    expert means, layers in order, experts in the job's order."""
    from harness.report import read_routing_csv

    routing = dict(ROUTING, mean_weight={**ROUTING["mean_weight"], "extra": [[0.5, 0.0]] * 3 + [[0.0, 1.0]]})
    for order in (["mnist", "fashion"], ["fashion", "mnist"]):
        given = dict(routing, experts=order)
        assert read_routing_csv(routing_csv(given, tmp_path / f"{order[0]}.csv")) == given


def test_heatmap_panels_show_the_means_and_the_title_clears_them():
    fig = routing_figure(ROUTING, "WeMoE routing weights")
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        panels = [ax for ax in fig.axes if ax.get_title().startswith("layer")]
        assert [ax.get_title() for ax in panels] == ["layer 0", "layer 1", "layer 2", "layer 3"]
        data = np.array([ROUTING["mean_weight"][t] for t in ("mnist", "fashion")])
        for li, ax in enumerate(panels):
            np.testing.assert_array_equal(ax.images[0].get_array(), data[:, li, :])
        title = fig._suptitle.get_window_extent(renderer)
        for ax in panels:
            assert not title.overlaps(ax.title.get_window_extent(renderer)), ax.get_title()
        assert panels[0].get_ylabel() and all(ax.get_xlabel() == "expert" for ax in panels)
    finally:
        plt.close(fig)


def legend_overlaps_as_saved(monkeypatch, draw, bars: bool) -> list[int]:
    """:func:`legend_overlaps` of each figure ``draw()`` saves (instead of saving it)."""
    import matplotlib.figure

    seen = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: seen.append(legend_overlaps(fig, bars)))
    draw()
    return seen


def legend_overlaps(fig, bars: bool) -> int:
    """How many task names (and bars, with ``bars``) the legend of ``fig``'s plot overlaps, drawn."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    covered = [*(p for p in ax.patches if bars), *ax.get_xticklabels()]
    return sum(legend.overlaps(item.get_window_extent(renderer)) for item in covered)


def test_robustness_legend_leaves_high_bars_and_labels_visible(tmp_path, monkeypatch):
    """Clean accuracies of 80-95% (a real CLIP's) reach the top of the axes, where a legend drawn
    inside covered the bars of the first groups: no legend entry may hide a bar or a group's name."""
    from harness.report import Row, plot_robustness

    corruptions = ["motion_blur", "impulse_noise", "gaussian_noise", "pixelate", "spatter", "contrast",
                   "jpeg_compression"]
    rows = [Row(f"method_{i}", "", {}, 50.0, None, metrics={f"robust/{c}/avg": 95.0 - 2 * j - i
                                                            for j, c in enumerate(["clean", *corruptions])})
            for i in range(12)]
    draw = lambda: plot_robustness(rows, corruptions, tmp_path / "robustness.png", "t")  # noqa: E731
    assert legend_overlaps_as_saved(monkeypatch, draw, bars=True) == [0]


def test_accuracy_legend_stays_under_long_task_names(tmp_path, monkeypatch):
    """Task names of 30 characters, rotated, reach further down than a fixed legend offset."""
    from harness.report import Row, plot_accuracy

    tasks = [f"{'x' * 30}{i}" for i in range(8)]
    rows = [Row(f"m{i}", "", dict.fromkeys(tasks, 50.0), 50.0, None) for i in range(15)]
    draw = lambda: plot_accuracy(rows, tasks, tmp_path / "accuracy.png", "t")  # noqa: E731
    assert legend_overlaps_as_saved(monkeypatch, draw, bars=False) == [0]


def test_every_row_of_a_large_sweep_has_a_bar_style_of_its_own(tmp_path, monkeypatch):
    """tab20 has twenty colours: in a sweep of 22 rows the 21st was drawn as the first, and the
    legend could not tell them apart."""
    import matplotlib.figure

    from harness.report import Row, plot_accuracy

    rows = [Row(f"m{i}", "", {"a": 50.0, "b": 40.0}, 45.0, None) for i in range(22)]
    styles = []

    def capture(fig, *args, **kwargs):
        for handle in fig.axes[0].get_legend().legend_handles:
            styles.append((tuple(handle.get_facecolor()), handle.get_hatch() or ""))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    plot_accuracy(rows, ["a", "b"], tmp_path / "accuracy.png", "t")
    assert len(styles) == 22 and len(set(styles)) == 22


def test_heatmap_colour_scale_is_named_and_spans_the_weights():
    """A colour bar without a name leaves a reader to guess what the colours measure."""
    fig = routing_figure(ROUTING, "WeMoE routing weights")
    try:
        bars = [ax for ax in fig.axes if not ax.get_title().startswith("layer")]
        assert len(bars) == 1 and bars[0].get_ylabel() == "mean routing weight"
        assert bars[0].get_ylim() == (0.0, 0.75)  # the smallest and largest mean weight in ROUTING
    finally:
        plt.close(fig)


def test_heatmap_panels_of_equal_weights_share_one_colour():
    """Routing left at its initial weights (no adaptation steps) is one value everywhere: each
    layer's panel drew it in another colour (only the last matched the colour bar)."""
    flat = {"experts": ["mnist", "fashion"], "layers": 3,
            "mean_weight": {t: [[0.3, 0.3]] * 3 for t in ("mnist", "fashion")}}
    fig = routing_figure(flat, "flat")
    try:
        fig.canvas.draw()
        panels = [ax for ax in fig.axes if ax.get_title().startswith("layer")]
        bar = next(ax for ax in fig.axes if ax not in panels)
        low, high = bar.get_ylim()
        want = np.array(plt.get_cmap("viridis")((0.3 - low) / (high - low)))  # where the bar shows 0.3
        for ax in panels:
            np.testing.assert_allclose(ax.images[0].to_rgba(np.array([[0.3]]))[0, 0], want, atol=0.01,
                                       err_msg=ax.get_title())
    finally:
        plt.close(fig)


def test_heatmap_labels_do_not_overlap_at_30_and_60_tasks():
    """WeMoE merges one expert per task: a panel kept 2 in wide whatever the count, so at 30 tasks
    the 6 pt expert names below it (0.1 in a line) were drawn on top of each other. No task name
    (rows) nor expert name (columns) may overlap the next one."""
    for n_tasks in (30, 60):
        tasks = [f"task_{i:02d}" for i in range(n_tasks)]
        routing = {"experts": tasks, "layers": 2,
                   "mean_weight": {t: [[(i + e) / 100 for e in range(n_tasks)]] * 2
                                   for i, t in enumerate(tasks)}}
        fig = routing_figure(routing, "WeMoE routing weights")
        try:
            fig.canvas.draw()
            renderer = fig.canvas.get_renderer()
            for labels in (fig.axes[0].get_yticklabels(), fig.axes[0].get_xticklabels()):
                assert [t.get_text() for t in labels] == tasks
                boxes = [t.get_window_extent(renderer) for t in labels]
                overlapping = [(labels[i].get_text(), labels[j].get_text()) for i in range(len(boxes))
                               for j in range(i + 1, len(boxes)) if boxes[i].overlaps(boxes[j])]
                assert overlapping == [], (n_tasks, overlapping[:3])
        finally:
            plt.close(fig)


def test_a_method_has_one_bar_style_in_both_plots_of_a_report(tmp_path, monkeypatch):
    """accuracy.png shows the reference rows and robustness.png not: each numbered its own series, so
    task_arithmetic was green in one and orange in the other (wemoe-embedded's report), and a failed
    row shifted every later colour. A method keeps its main-table row's style in every plot."""
    import matplotlib.figure

    from harness.report import Row, plot_accuracy, plot_robustness

    robust = {"robust/clean/avg": 50.0, "robust/contrast/avg": 40.0}
    rows = [Row("pretrained", "", {"a": 30.0}, 30.0, None, metrics=robust),
            Row("individual", "", {"a": 90.0}, 90.0, None),
            Row("broken", "failed", {}, None, None),
            *(Row(f"m{i}", "", {"a": 50.0}, 50.0, None, metrics=robust) for i in range(22))]
    styles: list[dict[str, tuple]] = []

    def capture(fig, *args, **kwargs):
        legend = fig.axes[0].get_legend()
        styles.append({text.get_text(): (tuple(handle.get_facecolor()), handle.get_hatch() or "")
                       for text, handle in zip(legend.get_texts(), legend.legend_handles)})

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", capture)
    plot_accuracy(rows, ["a"], tmp_path / "accuracy.png", "t")
    plot_robustness(rows, ["contrast"], tmp_path / "robustness.png", "t")
    accuracy, robustness = styles
    assert "individual" in accuracy and "individual" not in robustness and "broken" not in accuracy
    assert len(robustness) == 23 and {m: accuracy[m] for m in robustness} == robustness
    assert len(set(accuracy.values())) == len(accuracy) == 24


def test_heatmap_names_rows_by_task_columns_by_expert_and_scales_to_the_weights():
    """Rows are the tasks whose images were routed, columns the experts, in the job's order (here
    not the tasks' order, and one task no expert's); only the first panel names the rows; the colour
    scale spans the smallest to the largest weight (none of them 0) and the title is the one given."""
    routing = {"experts": ["svhn", "mnist"], "layers": 2,
               "mean_weight": {"mnist": [[0.2, 0.6], [0.3, 0.5]], "svhn": [[0.7, 0.1], [0.4, 0.4]],
                               "gtsrb": [[0.25, 0.35], [0.45, 0.15]]}}
    fig = routing_figure(routing, "wemoe on 3 tasks")
    try:
        fig.canvas.draw()
        panels = [ax for ax in fig.axes if ax.get_title().startswith("layer")]
        bar = next(ax for ax in fig.axes if ax not in panels)
        assert fig._suptitle.get_text() == "wemoe on 3 tasks"
        for li, ax in enumerate(panels):
            assert [t.get_text() for t in ax.get_xticklabels()] == ["svhn", "mnist"]
            rows = [t.get_text() for t in ax.get_yticklabels()]
            assert rows == (["mnist", "svhn", "gtsrb"] if li == 0 else ["", "", ""])
            np.testing.assert_array_equal(ax.images[0].get_array(), [routing["mean_weight"][t][li]
                                                                     for t in ("mnist", "svhn", "gtsrb")])
        assert bar.get_ylim() == (0.1, 0.7)
    finally:
        plt.close(fig)
