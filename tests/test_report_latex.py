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


def _tabular_rows(tex: str) -> tuple[str, list[str]]:
    """The tabular's column spec and its rows (header and body), as LaTeX reads them."""
    spec = re.search(r"\\begin\{tabular\}\{(.*)\}\n", tex).group(1)
    head, body = tex.split("\\midrule", 1)
    inner = head.split("\\toprule", 1)[1] + body.split("\\bottomrule")[0]
    return spec, [r.strip() for r in inner.split("\\\\\n") if r.strip()]


def test_a_long_setting_wraps_within_a_column_of_stated_width():
    """A tuned row's setting (here the 125 characters wemoe_batch_diversity's report showed) sat in an
    ``l`` column, one line wider than a page: it is a ``p`` column of SETTING_WIDTH now, set ragged-right
    in plain LaTeX (no package beyond booktabs), and every row still has one cell per column."""
    from harness.report import SETTING_WIDTH

    setting = ("init_lambda=0.6, router_depth=2, lr=0.001, steps=300, batch_size=16, routing=softmax, "
               "batch_reduce=True, diversity_weight=2.0")
    assert len(setting) == 125
    header = ["method", "setting", "emb_scenes", "avg", "norm avg"]
    body = [["wemoe_batch_diversity", setting, "81.3", "57.5", "78.9"],
            ["weight_averaging", "", "75.0", "41.0", "55.5"], ["100% & #1", "a_b", "1.0", "1.0", "1.0"]]
    tex = latex_table(header, body, "c")
    spec, rows = _tabular_rows(tex)
    assert spec == f"lp{{{SETTING_WIDTH}}}rrr"
    assert re.fullmatch(r"\d+(\.\d+)?cm", SETTING_WIDTH) and float(SETTING_WIDTH[:-2]) <= 5
    assert len(rows) == 1 + len(body)
    for row in rows:  # one cell per column: the & separating them, none escaped ones
        assert len(re.findall(r"(?<!\\)&", row)) == len(header) - 1, row
    assert rows[1].split(" & ")[1] == "\\raggedright " + setting.replace("_", "\\_")
    assert rows[2].split(" & ")[1] == "\\raggedright "
    assert rows[3].startswith("100\\% \\& \\#1 & \\raggedright a\\_b & ")
    assert _unescaped(tex, "{") == _unescaped(tex, "}")
    for char in "%_#":
        assert _unescaped(tex, char) == 0, char
    assert "\\usepackage" not in tex and "makecell" not in tex and ">{" not in spec


def test_a_setting_in_the_last_column_keeps_the_row_ending():
    """``\\raggedright`` in a row's last cell makes its ``\\\\`` a line break, not the row's end:
    that cell stays plain."""
    tex = latex_table(["method", "setting"], [["ties", "k=20, scaling=1.4"]], "c")
    spec, rows = _tabular_rows(tex)
    assert spec == "lp{4cm}" and rows[1] == "ties & k=20, scaling=1.4"
