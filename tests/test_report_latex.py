"""LaTeX tables: every special character of captions and cells printed literally."""

from __future__ import annotations

import re

from harness.report import latex_escape, latex_table


def _unescaped(tex: str, char: str) -> int:
    return len(re.findall(r"(?<!\\)" + re.escape(char), tex))


def test_caption_with_percent_underscore_and_braces_is_escaped():
    tex = latex_table(["method", "setting", "avg"], [["task_arithmetic", "scaling=0.3", "51.9"]],
                      "my_sweep: test top-1 accuracy (%), {settings} on validation & more #1")
    caption = next(line for line in tex.splitlines() if line.startswith("\\caption"))
    assert caption == ("\\caption{my\\_sweep: test top-1 accuracy (\\%), \\{settings\\} on validation "
                       "\\& more \\#1}")
    for char in "%_#":  # (& separates the tabular's columns)
        assert _unescaped(tex, char) == 0, char
    assert _unescaped(tex, "{") == _unescaped(tex, "}")  # the caption's closing brace is not commented out
    assert "task\\_arithmetic" in tex


def test_latex_escape_round_trips_through_a_literal_reading():
    text = r"a\b ~x^2 $5"
    escaped = latex_escape(text)
    assert escaped == r"a\textbackslash{}b \textasciitilde{}x\textasciicircum{}2 \$5"
    literal = (escaped.replace(r"\textbackslash{}", "\\").replace(r"\textasciitilde{}", "~")
               .replace(r"\textasciicircum{}", "^").replace(r"\$", "$"))
    assert literal == text


def test_plots_without_results_warn_nothing(tmp_path):
    """A sweep whose every job failed still writes its plot, without matplotlib's legend warning."""
    import warnings

    from harness.report import grouped_bars

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path = grouped_bars(["a", "b"], [], "accuracy (%)", tmp_path / "empty.png")
        grouped_bars(["a", "b"], [("m", [10.0, 20.0])], "accuracy (%)", tmp_path / "one.png", legend_below=True)
    assert path.stat().st_size > 0


def test_comparison_signs_print_as_themselves_and_numbers_align_right():
    """LaTeX's default font encoding prints a bare < as an inverted exclamation mark: the
    significance table's "<0.001" read "¡0.001". Text columns align left, numbers right."""
    tex = latex_table(["method", "against", "difference", "p"], [["a|b", "ties", "+1.0", "<0.001"]], "x > y")
    assert "\\caption{x \\textgreater{} y}" in tex
    assert "a\\textbar{}b & ties & +1.0 & \\textless{}0.001 \\\\" in tex
    assert "\\begin{tabular}{llrr}" in tex
    robustness = latex_table(["method", "clean", "contrast"], [["ties", "50.0", "40.0"]], "r")
    assert "\\begin{tabular}{lrr}" in robustness  # "clean" is a number column
    assert "<" not in tex.replace("\\textless{}", "") and ">" not in tex.replace("\\textgreater{}", "")
