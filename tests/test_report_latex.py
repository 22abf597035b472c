"""LaTeX tables: every special character of captions and cells printed literally."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

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


def _wide_table(n_tasks: int) -> tuple[list[str], list[list[str]]]:
    """A main table as a report builds it (the job results of tests/test_report_tables.py), for
    ``n_tasks`` tasks named like the embedded sweep's, one of them holding every LaTeX special."""
    from harness.results import build_rows, table_records
    from tests.test_report_tables import ok

    tasks = [f"emb_landcover_{i:02d}" for i in range(n_tasks - 1)] + ["100% a_b & #1"]
    acc = {t: 81.3 for t in tasks}
    setting = {"init_lambda": 0.6, "router_depth": 2, "lr": 0.001, "steps": 300, "batch_size": 16,
               "routing": "softmax", "batch_reduce": True, "diversity_weight": 2.0}
    results = [ok("pretrained", "pretrained", {}, acc, 50.0),
               *[ok("individual", "individual", {}, {t: 90.5}, 90.5, task=t) for t in tasks],
               ok("merge", "wemoe_softmax_diversity", setting, acc, 60.0)]
    rows = build_rows(results, tasks, ["wemoe_softmax_diversity"])
    return table_records(rows, tasks)


def test_a_table_is_shrunk_to_the_line_and_task_names_set_upright():
    """An 8-task main table ran 856pt wide on a 345pt article page (501pt with its task names set
    vertically and 4pt between columns): the tabular sits in a graphicx box scaled down to the line width when wider
    (``\\minof`` from calc: a bare > would print as an inverted question mark in captions), with
    4pt between columns; a number column's name longer than its figures is rotated, others not."""
    from harness.report import COLUMN_SEPARATION

    header, body = _wide_table(8)
    tex = latex_table(header, body, "c", "tab:x")
    lines = tex.splitlines()
    assert lines[:5] == ["\\begin{table}", "\\centering", "\\caption{c}", "\\label{tab:x}",
                         f"\\setlength{{\\tabcolsep}}{{{COLUMN_SEPARATION}}}"]
    assert COLUMN_SEPARATION == "4pt"
    box = "\\resizebox{\\minof{\\width}{\\linewidth}}{!}{"
    assert lines[5].startswith(box + "\\begin{tabular}") and lines[-2:] == ["\\end{tabular}}", "\\end{table}"]
    spec, rows = _tabular_rows(tex)
    cells = rows[0].split(" & ")
    assert cells[:2] == ["method", "setting"] and cells[-2:] == ["avg", "\\rotatebox{90}{norm avg}"]
    assert cells[2] == "\\rotatebox{90}{emb\\_landcover\\_00}"
    assert cells[-3] == "\\rotatebox{90}{100\\% a\\_b \\& \\#1}"
    narrow = latex_table(["method", "against", "difference", "95% interval"],
                         [["ties", "ta", "+1.0", "[-1.0, +2.0]"]], "s")
    assert "method & against & \\rotatebox{90}{difference} & 95\\% interval \\\\" in narrow


#: The preamble the README names for the report's tables.
PREAMBLE = "\\usepackage{booktabs,graphicx,calc}"


def _typeset(tex: str, two_column: bool, tmp_path) -> dict[str, float]:
    """Compile ``tex`` (a ``table``; a ``table*`` on a two-column page) with pdflatex: the line width,
    the natural width of what is fitted (the tabular, or the stacked blocks of one) and the width it
    is typeset at (pt), and any Overfull hbox."""
    from harness.report import FIT_TO_LINE

    star = tex.replace("{table}", "{table*}") if two_column else tex
    setup = "".join(line for line in tex.splitlines() if line.startswith("\\setlength"))
    tabular = tex[tex.index(FIT_TO_LINE) + len(FIT_TO_LINE):tex.rindex("}\n\\end{table}")]
    # the table's body; its line ends, spaces in the measuring box, not in the float's vertical list
    fitted = re.search(r"\\label\{.*?\}\n(.*)\n\\end\{table\}", tex, re.S).group(1).replace("\n", "%\n")
    env = "table*" if two_column else "table"
    doc = (f"\\documentclass{'[twocolumn]' if two_column else ''}{{article}}{PREAMBLE}\\begin{{document}}\n{star}"
           f"\\begin{{{env}}}{setup}\\setbox0\\hbox{{{tabular}}}\\setbox2\\hbox{{{fitted}}}"
           "\\typeout{WIDTHS \\the\\linewidth\\space\\the\\wd0 \\space\\the\\wd2}"
           f"\\end{{{env}}}\n\\end{{document}}\n")
    (tmp_path / "doc.tex").write_text(doc)
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    log = (tmp_path / "doc.log").read_text(errors="replace")
    assert done.returncode == 0, log[-2000:]
    line, natural, typeset = re.search(r"WIDTHS ([\d.]+)pt ([\d.]+)pt ([\d.]+)pt", log).groups()
    return {"line": float(line), "natural": float(natural), "typeset": float(typeset),
            "overfull": len(re.findall(r"Overfull \\hbox", log))}


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
@pytest.mark.parametrize("two_column", [False, True], ids=["article", "twocolumn-table*"])
@pytest.mark.parametrize("n_tasks", [8, 20])
def test_a_wide_table_compiles_within_the_page(n_tasks, two_column, tmp_path):
    """The main table of 8 and of 20 tasks (a task name holding % _ & #), wider than the page as
    set, compiles and is typeset at the line width, no Overfull hbox, at a readable scale; a narrow
    one keeps its size. The 20 tasks' stacked blocks (:func:`harness.report.column_blocks`) are
    narrower than a ``table*``'s line: they keep their size there."""
    from harness.report import READABLE_SCALE

    header, body = _wide_table(n_tasks)
    wide = _typeset(latex_table(header, body, "my_sweep: 100% & #1", "tab:my_sweep-main"), two_column, tmp_path)
    assert wide["overfull"] == 0, wide
    if n_tasks == 20 and two_column:
        assert wide["natural"] < wide["line"], wide
        assert wide["typeset"] == pytest.approx(wide["natural"], abs=0.1)
    else:
        assert wide["natural"] > wide["line"], wide
        assert wide["typeset"] == pytest.approx(wide["line"], abs=0.1)
    assert wide["typeset"] / wide["natural"] >= READABLE_SCALE, wide
    narrow = _typeset(latex_table(["method", "avg"], [["ties", "50.0"]], "n", "tab:n"), two_column, tmp_path)
    assert narrow["natural"] < narrow["line"] and narrow["overfull"] == 0, narrow
    assert narrow["typeset"] == pytest.approx(narrow["natural"], abs=0.1)


def _distinct_table(n_tasks: int) -> tuple[list[str], list[list[str]]]:
    """A main table's header and rows with a different figure in every cell."""
    tasks = [f"emb_landcover_{i:02d}" for i in range(n_tasks - 1)] + ["100% a_b & #1"]
    header = ["method", "setting", *tasks, "avg", "norm avg"]
    methods = [("pretrained", "zero-shot"), ("individual", "per task"),
               ("wemoe_softmax_diversity", "init_lambda=0.6, router_depth=2, lr=0.001, steps=300, batch_size=16")]
    body = [[m, s, *[f"{10 * r + 0.1 * c + 20:.1f}" for c in range(n_tasks + 2)]] for r, (m, s) in enumerate(methods)]
    return header, body


def _blocks(tex: str) -> list[tuple[list[str], list[list[str]]]]:
    """Each tabular of the table (its column names, rotation undone, and its rows' cells)."""
    found = []
    for block in re.findall(r"\\begin\{tabular\}\{[^@].*?\\end\{tabular\}\n?", tex, re.S):
        spec, rows = _tabular_rows(block if block.endswith("\n") else block + "\n")
        cells = [re.split(r"(?<!\\)&", row) for row in rows]
        names = [re.sub(r"^\\rotatebox\{90\}\{(.*)\}$", r"\1", c.strip()) for c in cells[0]]
        assert len(spec) == len(names) + 5 * spec.count("p{"), spec  # a p{4cm} column spec is 6 characters
        found.append((names, [[c.strip() for c in row] for row in cells[1:]]))
    return found


def test_a_20_task_table_is_stacked_blocks_holding_each_cell_once():
    """A 20-task main table set in one tabular was scaled to 43% on an article page: it is set as
    stacked tabulars, each repeating the method and setting columns, the others in order (the
    averages in the last block), each row's every figure once, under its own column; an 8-task
    table (69%) stays one tabular."""
    header, body = _distinct_table(20)
    tex = latex_table(header, body, "c", "tab:x")
    blocks = _blocks(tex)
    assert 1 < len(blocks) <= 3 and tex.count("\\begin{tabular}{@{}l@{}}") == 1
    truth = {(row[0], name): value for row in body for name, value in zip(header[2:], row[2:])}
    seen: list[tuple[str, str]] = []
    order: list[str] = []
    for names, rows in blocks:
        assert names[:2] == ["method", "setting"]
        assert [row[0] for row in rows] == [latex_escape(row[0]) for row in body]
        order += names[2:]
        for row, given in zip(rows, body):
            assert row[1] == "\\raggedright " + latex_escape(given[1])
            for name, value in zip(names[2:], row[2:]):
                seen.append((given[0], name))
                assert value == truth[(given[0], next(h for h in header if latex_escape(h) == name))]
    assert order == [latex_escape(h) for h in header[2:]]
    assert len(seen) == len(set(seen)) == len(truth)
    assert blocks[-1][0][-2:] == ["avg", "norm avg"]
    assert len(_blocks(latex_table(*_distinct_table(8), "c"))) == 1
    assert latex_table(*_distinct_table(8), "c").count("\\begin{tabular}") == 1


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed")
@pytest.mark.parametrize("two_column", [False, True], ids=["article", "twocolumn-table*"])
def test_a_20_task_tables_blocks_are_set_at_a_readable_scale(two_column, tmp_path):
    """Measured by pdflatex: the stacked blocks of a 20-task table are set at 70% or more of their
    size (one scale for all), no Overfull hbox."""
    header, body = _distinct_table(20)
    typeset = _typeset(latex_table(header, body, "c", "tab:x"), two_column, tmp_path)
    assert typeset["overfull"] == 0, typeset
    assert typeset["typeset"] == pytest.approx(min(typeset["natural"], typeset["line"]), abs=0.1)
    assert typeset["typeset"] / typeset["natural"] >= 0.7, typeset


def test_columns_too_wide_for_two_blocks_are_split_into_three_of_near_equal_counts():
    """A method column and 8 number columns of 25 digits (133pt each, separation included): 4 of
    them beside the method overrun the readable line (345pt / (2/3) = 517.5pt), 3 fit. So three
    blocks, of 3, 3 and 2 number columns (not 2, 2 and 4, which would not fit), each led by the method."""
    from harness.report import column_blocks

    header = ["method", *[f"t{i}" for i in range(8)]]
    body = [["x", *["1" * 25] * 8]]
    assert column_blocks(header, body) == [[0, 1, 2, 3], [0, 4, 5, 6], [0, 7, 8]]
