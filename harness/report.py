"""Paper-style reports: main, generalization and robustness tables (Markdown, CSV, LaTeX) and
plots, built from a sweep's MLflow runs (or from the results a sweep just produced)."""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from harness.cache import atomic_write_bytes
from harness.config import GENERALIZATION, MAIN, SweepConfig, reference_row
from harness.errors import HarnessError, did_you_mean, last_line
from harness.job import JobResult
from harness.models import file_digest
from harness.plan import base_label, harness_code_id
from harness.results import (
    FAILED,
    Row,
    TrialCounts,
    build_rows,
    generalization_rows,
    generalization_table_records,
    markdown_table,
    robustness_records,
    select_best,
    table_records,
)
from harness.significance import CORRECT_FILE, LEVEL, paired_bootstrap, read_correct, unpack_correct
from harness.tracking import (FINAL_KEY_TAG, JOB_TAG, PROTOCOL_TAG, SCOPE_TAG, STUDY_FAILURE_TAG, SWEEP_TAG,
                              TRIALS_TAG, allow_folder_stores, check_reachable)

# The job keys a report was built from. A sweep's parent run outlives its inputs (it is found
# again by config digest, so replaced checkpoints or data add new job runs beside the old ones):
# a report rebuilt from MLflow reads only the runs this file names.
JOBS_FILE = "jobs.json"


@dataclass
class Report:
    tables: dict[str, tuple[list[str], list[list[str]]]]
    files: list[Path] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)  # the main table's rows
    generalization_rows: list[Row] = field(default_factory=list)  # the generalization block's, if any


def generalization_records(rows: list[Row], seen: list[str], unseen: list[str]) -> tuple[list[str], list[list[str]]]:
    """A top-level ``unseen`` sweep's generalization table. The individual row is left out, as
    from the ``generalization`` block's: a model fine-tuned on an unseen task has seen it."""
    header = ["method", "seen avg", *unseen, "unseen avg"]
    body = []
    for r in rows:
        if r.method == "individual":
            continue
        if r.failed:
            body.append([r.method, *[FAILED] * (len(header) - 1)])
            continue
        vals = [r.acc.get(t) for t in unseen]
        if any(v is None for v in vals):
            continue
        body.append([r.method, f"{r.avg:.1f}", *[f"{v:.1f}" for v in vals], f"{sum(vals) / len(vals):.1f}"])
    return header, body


def default_reference(rows: list[Row]) -> list[str]:
    """Task arithmetic, the baseline every merging paper compares against; else the first method."""
    methods = [r.method for r in rows
               if not reference_row(r.method) and not r.failed]
    return ["task_arithmetic"] if "task_arithmetic" in methods else methods[:1]


def significance_records(rows: list[Row], seen: list[str],
                         against: list[str]) -> tuple[list[str], list[list[str]]]:
    """Every row's average test accuracy minus each reference row's, with a paired bootstrap
    interval over the test images (:mod:`harness.significance`). Rows without per-image records
    (results cached by an older version) are left out."""
    header = ["method", "against", "difference", f"{LEVEL:.0%} interval", "p", "test images"]
    body = []
    complete = {r.method: r for r in rows if all(t in r.test_correct for t in seen)}
    for ref in against:
        if ref not in complete:
            continue
        b = {t: unpack_correct(complete[ref].test_correct[t]) for t in seen}
        for r in rows:
            if r.method == ref or r.method not in complete:
                continue
            d = paired_bootstrap({t: unpack_correct(r.test_correct[t]) for t in seen}, b, seen)
            body.append([r.method, ref, f"{d.diff:+.1f}", f"[{d.low:+.1f}, {d.high:+.1f}]",
                         f"{d.p:.3f}" if d.p >= 0.001 else "<0.001", str(d.images)])
    return header, body


# < > | are not special to LaTeX's parser, but its default font encoding (OT1) prints them as
# inverted exclamation and question marks and a dash: a p-value "<0.001" would read "¡0.001".
_LATEX_SPECIALS = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                   "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                   "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}"}
#: Columns of text (left-aligned in LaTeX); every other column holds numbers (right-aligned).
TEXT_COLUMNS = ("method", "setting", "against")


def latex_escape(text: str) -> str:
    """Text as LaTeX prints it literally (sweep names hold underscores, captions a percent sign)."""
    return "".join(_LATEX_SPECIALS.get(c, c) for c in text)


#: The width the ``setting`` column wraps at: a tuned row's hyperparameters (120 characters and
#: more) in one line ran the table off the page.
SETTING_WIDTH = "4cm"


def latex_table(header: list[str], body: list[list[str]], caption: str, label: str | None = None) -> str:
    """A booktabs tabular, via pandas; every cell, header and the caption escaped here. ``label``
    (``tab:<sweep>-<table>``, of a sweep name's safe characters) lets a paper ``\\ref`` the table.
    Fitted to the page (:func:`fitted_table`): it needs booktabs, graphicx and calc. A table too
    wide to read once fitted is set as stacked blocks of its columns (:func:`column_blocks`)."""
    blocks = [_tabular(header, body, columns) for columns in column_blocks(header, body)]
    if len(blocks) == 1:
        return fitted_table(blocks[0], latex_escape(caption), label)
    # one box holding the blocks, so that all are scaled alike; left-aligned, their method and
    # setting columns one under another
    stacked = BLOCK_GAP.join(b.rstrip("\n") for b in blocks)
    return fitted_table(f"\\begin{{tabular}}{{@{{}}l@{{}}}}\n{stacked}\n\\end{{tabular}}", latex_escape(caption), label)


def _tabular(header: list[str], body: list[list[str]], columns: list[int]) -> str:
    """The tabular of ``header``'s ``columns`` (indices) of every row."""
    import pandas as pd

    names = [header[i] for i in columns]
    ragged = [h == "setting" and k < len(names) - 1 for k, h in enumerate(names)]
    cells = [_latex_header(header[i], [str(row[i]) for row in body]) for i in columns]
    frame = pd.DataFrame([[_latex_cell(str(row[i]), r) for i, r in zip(columns, ragged)] for row in body],
                         columns=cells)
    return frame.to_latex(index=False, escape=False, column_format="".join(_latex_column(h) for h in names))


#: Space either side of a column (LaTeX's default: 6pt); the main table's dozen columns gained 48pt
#: of width, a tenth of it, for no gain in reading.
COLUMN_SEPARATION = "4pt"
#: A tabular wider than the column (or the page, in a ``table*``) is scaled down to it; a narrower
#: one keeps its size. ``\width`` is the tabular's natural width (graphicx's \resizebox); calc's
#: ``\minof``, not ``\ifdim``: a bare > or < in a table file is what a caption must never hold.
FIT_TO_LINE = r"\resizebox{\minof{\width}{\linewidth}}{!}{"


def fitted_table(tabular: str, caption: str, label: str | None) -> str:
    """``tabular`` in a centred ``table``, shrunk to the line width when wider: an 8-task main table
    ran 2.5 times the width of an article page."""
    lines = ["\\begin{table}", "\\centering", f"\\caption{{{caption}}}"]
    lines += [f"\\label{{{label}}}"] if label else []
    lines += [f"\\setlength{{\\tabcolsep}}{{{COLUMN_SEPARATION}}}"]
    # the tabular joined to the box's braces: a line's end inside them is a space, widening the box
    return "\n".join([*lines, FIT_TO_LINE + tabular.rstrip("\n") + "}", "\\end{table}", ""])


#: The line width a table is made readable for: an ``article`` page's (10pt, letter or A4), in pt.
READABLE_LINE_PT = 345.0
#: The least scale a fitted table is set at before its columns are split into blocks: an 8-task
#: main table is set at 69% of its size on that line, readable; a 20-task one was set at 43%.
READABLE_SCALE = 2 / 3
#: Between two stacked blocks: a row end, then booktabs' space between rows, a big skip (a row
#: end's own ``[space]`` adds to a strut's depth, which a block's centred tabular already exceeds).
BLOCK_GAP = "\n\\\\\\addlinespace[\\bigskipamount]\n"

# Computer Modern's widths at 10pt (LaTeX's default font; \_ as LaTeX draws it), in pt, checked with pdflatex:
# what a column's width is estimated from. Other capitals about 7.2pt, other characters 5pt.
_GLYPH_PT = {**dict(zip("abcdefghijklmnopqrstuvwxyz", (5.0, 5.56, 4.44, 5.56, 4.44, 3.06, 5.0, 5.56, 2.78, 3.06,
                                                       5.28, 2.78, 8.33, 5.56, 5.0, 5.56, 5.28, 3.92, 3.94, 3.89,
                                                       5.56, 5.28, 7.22, 5.28, 5.28, 4.44))),
             **dict.fromkeys("0123456789", 5.0), **dict.fromkeys(".,:;!'[]", 2.78), **dict.fromkeys("()", 3.89),
             **dict.fromkeys("-_ ", 3.33), **dict.fromkeys("+=<>&", 7.78), **dict.fromkeys("%#", 8.33)}
#: A name set vertically is as wide as the font is tall (with descenders).
_ROTATED_PT = 9.0


def text_width_pt(text: str) -> float:
    """``text``'s estimated width, typeset in LaTeX's default font."""
    return sum(_GLYPH_PT.get(c, 7.2 if c.isupper() else 5.0) for c in text)


def _column_width_pt(name: str, cells: list[str]) -> float:
    """The estimated width of column ``name`` as :func:`_tabular` sets it, its separation included."""
    if name == "setting":
        inner = float(SETTING_WIDTH.removesuffix("cm")) * 72.27 / 2.54
    else:
        rotated = _latex_header(name, cells) != latex_escape(name)
        inner = max([_ROTATED_PT if rotated else text_width_pt(name), *map(text_width_pt, cells)])
    return inner + 2 * float(COLUMN_SEPARATION.removesuffix("pt"))


def column_blocks(header: list[str], body: list[list[str]]) -> list[list[int]]:
    """``header``'s column indices in blocks, each repeating the leading text columns (method,
    setting) and holding the next run of the others, in order (so a table's averages fall in its
    last block): the fewest blocks, of as even column counts as may be, each of which fits
    :data:`READABLE_LINE_PT` at :data:`READABLE_SCALE` or more, by estimated width. One block
    (the table as it is) when it fits, or when no split into blocks fits."""
    lead = 0
    while lead < len(header) and header[lead] in TEXT_COLUMNS:
        lead += 1
    widths = [_column_width_pt(h, [str(row[i]) for row in body]) for i, h in enumerate(header)]
    fixed, rest = sum(widths[:lead]), list(range(lead, len(header)))
    limit = READABLE_LINE_PT / READABLE_SCALE
    for n in range(1, len(rest) + 1):
        size, extra = divmod(len(rest), n)
        starts = [k * size + min(k, extra) for k in range(n + 1)]
        runs = [rest[a:b] for a, b in zip(starts, starts[1:])]
        if all(fixed + sum(widths[i] for i in run) <= limit for run in runs):
            return [[*range(lead), *run] for run in runs] if n > 1 else [list(range(len(header)))]
    return [list(range(len(header)))]


def _latex_header(name: str, cells: list[str]) -> str:
    """``name`` escaped; a number column's name longer than its every cell (a task's name over
    figures like 81.3) set vertically, so that the column is as narrow as its figures."""
    if name in TEXT_COLUMNS or all(len(name) <= len(c) for c in cells):
        return latex_escape(name)
    return f"\\rotatebox{{90}}{{{latex_escape(name)}}}"


def _latex_column(name: str) -> str:
    """A wrapping paragraph column for the setting, left-aligned text, right-aligned numbers."""
    if name == "setting":
        return f"p{{{SETTING_WIDTH}}}"
    return "l" if name in TEXT_COLUMNS else "r"


def _latex_cell(text: str, ragged: bool) -> str:
    """``text`` escaped; ``ragged``: set ragged-right, as a setting's few break points, justified,
    stretched its spaces wide (plain LaTeX, no array package: only a cell before the row's last may
    hold ``\\raggedright``, which would turn the row's ending ``\\\\`` into a line break)."""
    return ("\\raggedright " if ragged else "") + latex_escape(text)


def csv_table(header: list[str], body: list[list[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(body)
    return buf.getvalue()


REPORT_FILES = tuple(f"{name}.{ext}" for name in ("main", "generalization", "significance", "robustness")
                     for ext in ("md", "csv", "tex")) + ("accuracy.png", "robustness.png", "routing.png")
"""What :func:`build_report` may write (besides jobs.json and ``routing-<row>.png``): one it does
not write this time is removed (``routing.png``: what reports wrote before there was one per row)."""


def file_stems(labels: Iterable[str]) -> dict[str, str]:
    """Each row label made a safe file-name stem. Labels whose safe forms coincide (``wemoe a``
    and ``wemoe_a``) would write one file: each that had characters replaced gets a digest of
    itself appended, so no row's file overwrites another's; every other stem is the plain one."""
    safe = {label: re.sub(r"[^A-Za-z0-9_.-]+", "_", label) for label in labels}
    taken = Counter(safe.values())
    return {label: stem if stem == label or taken[stem] == 1
            else f"{stem}-{hashlib.sha1(label.encode()).hexdigest()[:8]}" for label, stem in safe.items()}


#: Seconds after which a report's temporary file is a killed writer's: writing a table or a plot
#: takes well under one, and a report being written beside (``harness report`` into a sweep's
#: folder, which it does not lock) keeps its own files fresh.
STALE_WRITE_S = 600.0


def remove_stale_writes(out: Path) -> None:
    """Remove the temporary files (``.<name>.<x>.tmp``) a writer killed while writing ``out`` left,
    those untouched for :data:`STALE_WRITE_S`: a rerun renames its own, never these."""
    now = time.time()
    for tmp in out.glob(".*.tmp"):
        try:
            if now - tmp.stat().st_mtime > STALE_WRITE_S:
                tmp.unlink()
        except FileNotFoundError:  # renamed or removed by the writer it belongs to meanwhile
            pass


def build_report(cfg: SweepConfig, results: list[JobResult], out: Path,
                 routing: Mapping[str, dict[str, Any]] | None = None, against: list[str] | None = None,
                 studies: Mapping[tuple[str, str], TrialCounts] | None = None,
                 plot_record: Path | None = None) -> Report:
    """Write every table in three formats and the plots into ``out``; return what was written.

    ``routing``: routing statistics by row label (:func:`row_routings`), one heatmap each;
    ``against``: the rows the significance table compares every other row with (default:
    :func:`default_reference`); ``studies``: tuned methods' trial counts (see :func:`build_rows`);
    ``plot_record``: where :func:`kept_plot` records the plots, so that a plot drawn from the same
    inputs by the same code is kept instead of drawn again (None: every plot is drawn)."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_writes(out)
    seen, tasks = cfg.merge_tasks, cfg.task_names
    unseen = [t for t in tasks if t not in seen]
    rows = build_rows(results, tasks, [m.display for m in cfg.methods], seen, studies)
    tables = {"main": table_records(rows, tasks, seen)}
    captions = {"main": f"{cfg.name}: test top-1 accuracy (%), settings chosen on validation"}
    if unseen:
        tables["generalization"] = generalization_records(rows, seen, unseen)
        captions["generalization"] = f"{cfg.name}: merged on {', '.join(seen)}; unseen {', '.join(unseen)}"
    gen_rows: list[Row] = []
    if cfg.generalization:  # the block's own jobs (the whole-sweep split and the block never coexist)
        gen_seen = cfg.generalization_seen
        gen_rows = generalization_rows(results, tasks, [m.display for m in cfg.methods], gen_seen)
        tables["generalization"] = generalization_table_records(gen_rows, tasks, gen_seen)
        captions["generalization"] = (f"{cfg.name}: merged and adapted on {', '.join(gen_seen)}; unseen "
                                      f"{', '.join(t for t in tasks if t not in gen_seen)}; settings chosen on "
                                      "the seen tasks' validation")
    against = list(dict.fromkeys(against)) if against else None  # a row named twice is compared with once
    unknown = [a for a in against or [] if a not in {r.method for r in rows}]
    if unknown:
        names = [r.method for r in rows]
        raise HarnessError(f"--against {unknown[0]!r}: not a row of the main table{did_you_mean(unknown[0], names)} "
                           f"(rows: {', '.join(names)})")
    failed = [a for a in against or [] if any(r.method == a and r.failed for r in rows)]
    if failed:
        raise HarnessError(f"--against {failed[0]!r} failed in this sweep: it has no test "
                           "predictions to compare with")
    unrecorded = [a for a in against or [] if not any(r.method == a and all(t in r.test_correct for t in seen)
                                                      for r in rows)]
    if unrecorded:  # else its comparisons were left out without a word, and with them the whole table
        raise HarnessError(f"--against {unrecorded[0]!r}: its results hold no per-image test records (cached by a "
                           "version that kept none): it has no test predictions to compare with")
    significance = significance_records(rows, seen, against or default_reference(rows))
    if significance[1]:
        tables["significance"] = significance
        captions["significance"] = (f"{cfg.name}: difference of average test accuracy (points), paired "
                                    "bootstrap over test images")
    if cfg.robustness:
        tables["robustness"] = robustness_records(rows, cfg.robustness.corruptions)
        captions["robustness"] = (f"{cfg.name}: average accuracy on {', '.join(cfg.robustness.tasks)} "
                                  f"under corruptions (severity {cfg.robustness.severity})")
    report = Report(tables, rows=rows, generalization_rows=gen_rows)
    jobs = out / JOBS_FILE
    # written whole or not at all: `harness export` and `harness report` may read it while a sweep writes it
    write_text(jobs, json.dumps([job_entry(r, studies) for r in results if r.key], indent=0))  # a job two labels share: both
    report.files.append(jobs)
    for name, (header, body) in tables.items():
        for ext, text in (("md", markdown_table(header, body)), ("csv", csv_table(header, body)),
                          ("tex", latex_table(header, body, captions[name], f"tab:{cfg.name}-{name}"))):
            path = out / f"{name}.{ext}"
            write_text(path, text)
            report.files.append(path)
    drawn = read_plot_record(plot_record)
    report.files.append(plot_accuracy(rows, seen, out / "accuracy.png", captions["main"], drawn))
    if cfg.robustness:
        report.files.append(plot_robustness(rows, cfg.robustness.corruptions, out / "robustness.png",
                                            captions["robustness"], drawn))
    if routing:
        from harness.plots import routing_heatmap

        stems = file_stems(routing)
        for label, stats in routing.items():
            path, title = out / f"routing-{stems[label]}.png", f"{cfg.name}: WeMoE routing weights, {label}"
            report.files.append(kept_plot(drawn, path, {"plot": "routing", "routing": stats, "title": title},
                                          functools.partial(routing_heatmap, stats, path, title)))
    write_plot_record(plot_record, drawn, report.files)
    written = set(report.files)
    # an earlier report's table or plot this sweep no longer has (a block removed, a row renamed)
    for stale in [*(out / name for name in REPORT_FILES), *out.glob("routing-*.png")]:
        if stale not in written:
            stale.unlink(missing_ok=True)
    return report


#: The file (in a sweep's ``work/``) recording the plots its report drew (:func:`kept_plot`).
PLOT_RECORD = "report-plots.json"

PlotRecord = dict[str, list[str]]
"""A report folder's plots by path: the digest of what each was drawn from, and of its PNG."""

#: Files whose contents restyle a plot without entering its inputs (``matplotlib.matplotlib_fname``'s search).
_RC_FILES = ("matplotlibrc", "$MATPLOTLIBRC", "$MATPLOTLIBRC/matplotlibrc", "$MPLCONFIGDIR/matplotlibrc",
             "$XDG_CONFIG_HOME/matplotlib/matplotlibrc", "~/.config/matplotlib/matplotlibrc")


def read_plot_record(path: Path | None) -> PlotRecord | None:
    """The record :func:`write_plot_record` left (empty if none or unreadable); None without a path."""
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_plot_record(path: Path | None, drawn: PlotRecord | None, files: list[Path]) -> None:
    """Keep the entries of this report's plots only: a plot no longer written is drawn again if it returns."""
    if path is None or drawn is None:
        return
    names = {str(f) for f in files}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, json.dumps({k: v for k, v in drawn.items() if k in names}, indent=0).encode())


def kept_plot(drawn: PlotRecord | None, path: Path, inputs: Mapping[str, Any], draw: Callable[[], Path]) -> Path:
    """``draw()`` the plot at ``path``, unless ``drawn`` says the file there is what it would draw:
    the same ``inputs`` (all it is drawn from besides the code), harness code, matplotlib and
    Pillow versions and matplotlibrc files, and the PNG unchanged since. A fully cached rerun thus
    keeps its plots: drawing them took most of its time after imports, and the first imports matplotlib."""
    if drawn is None:
        return draw()
    key = plot_inputs_digest(inputs)
    png = readable_digest(path) if key else ""
    if png and drawn.get(str(path)) == [key, png]:  # a file that cannot be read is drawn again
        return path
    draw()
    if key:
        drawn[str(path)] = [key, readable_digest(path)]
    return path


def plot_inputs_digest(inputs: Mapping[str, Any]) -> str:
    """A digest of what a plot is drawn from; empty (never kept) where the code is not known."""
    code = harness_code_id()[1]
    if not code:
        return ""
    libs = plot_library_versions()
    if libs is None:
        return ""
    rc = []
    for name in _RC_FILES:
        candidate = Path(os.path.expanduser(os.path.expandvars(name)))
        if "$" not in str(candidate) and candidate.is_file():
            rc.append([str(candidate), readable_digest(candidate)])
    try:  # plain data only: anything else (whose text might not tell values apart) is drawn every time
        text = json.dumps([code, libs, rc, inputs], sort_keys=True)
    except (TypeError, ValueError):
        return ""
    return hashlib.sha256(text.encode()).hexdigest()


@functools.cache
def plot_library_versions() -> list[str] | None:
    """The installed matplotlib and Pillow versions (None if either is missing), looked up once a
    process: reading the packages' metadata took ~3 ms, for every plot of a report."""
    try:
        return [metadata.version("matplotlib"), metadata.version("pillow")]
    except metadata.PackageNotFoundError:
        return None


def readable_digest(path: Path) -> str:
    """:func:`harness.models.file_digest` of a file; empty if it cannot be read (a plot not drawn
    yet or gone, an rc file we may not read), which keeps no plot."""
    try:
        return file_digest(path)
    except OSError:
        return ""


def write_text(path: Path, text: str) -> None:
    """A report file replaced whole (:func:`harness.cache.atomic_write_bytes`): a command reading
    the folder while a sweep or ``harness report`` rewrites it, or after one was killed mid-write,
    reads the old file or the new one, never a half of it."""
    atomic_write_bytes(path, text.encode())


def job_entry(result: JobResult, studies: Mapping[tuple[str, str], TrialCounts] | None) -> list[Any]:
    """``[label, key, counts, params]`` in jobs.json: for a tuned row's job the trial counts its
    row states (else null), and the setting the row gives the job. ``harness report`` rebuilds the
    row as this sweep wrote it, where its study's tuning run holds the counts of whatever ``harness
    tune`` has run since (a longer study, or another best), and the job's run holds the params it
    was first logged with (a job a tuned best shares with one run before a default joined its space)."""
    counts = (studies or {}).get((result.label, result.key))
    return [result.label, result.key, dataclasses.asdict(counts) if counts is not None else None, result.params]


def tune_table_stem(cfg: SweepConfig, label: str) -> str:
    """``tune-<label>``, the label made a safe file name apart from the sweep's other labels'."""
    return "tune-" + file_stems(dict.fromkeys([label, *(m.display for m in cfg.methods)]))[label]


def build_tune_table(cfg: SweepConfig, results: list[JobResult], out: Path, label: str,
                     studies: Mapping[tuple[str, str], TrialCounts] | None = None) -> Report:
    """``harness tune``'s table (the reference rows and the tuned method's) as
    ``tune-<label>.md`` and ``.csv`` in ``out``, beside the sweep's own tables: those, and the
    job list ``harness report`` rebuilds them from, are the whole sweep's, written by ``harness sweep``."""
    out.mkdir(parents=True, exist_ok=True)
    seen, tasks = cfg.merge_tasks, cfg.task_names
    rows = build_rows(results, tasks, [label], seen, studies)
    header, body = table_records(rows, tasks, seen)
    report = Report({tune_table_stem(cfg, label): (header, body)}, rows=rows)
    for ext, text in (("md", markdown_table(header, body)), ("csv", csv_table(header, body))):
        path = out / f"{tune_table_stem(cfg, label)}.{ext}"
        write_text(path, text)
        report.files.append(path)
    return report


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Past tab20's twenty colours a series repeats a colour: hatched, it stays apart in the legend.
_HATCHES = ("", "///", "...", "xxx")


def grouped_bars(groups: list[str], series: list[tuple[str, list[float]]], ylabel: str, path: Path,
                 legend_below: bool = False, title: str = "", slots: tuple[list[int], int] | None = None) -> Path:
    """One bar per series in every group; a distinct colour per series (tab20 past ten, then
    tab20 hatched past twenty). The title says what a figure shows once it is out of its folder
    (sweep, tasks, severity). ``slots``: each series' style number among how many there are (by
    default its position among ``series``), so that a method keeps its style across plots."""
    import numpy as np

    plt = _pyplot()
    numbers, n_styles = slots or (list(range(len(series))), len(series))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(groups)), 3.6))
    cmap = plt.get_cmap("tab10" if n_styles <= 10 else "tab20")
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, ((label, values), n) in enumerate(zip(series, numbers)):
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=label, color=cmap(n % cmap.N),
               hatch=_HATCHES[n // cmap.N % len(_HATCHES)])
    ax.set_xticks(x, groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    if title:
        ax.set_title(title, fontsize=9)
    if series and legend_below:
        ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, _below_tick_labels(fig, ax)))
    elif series:
        ax.legend(fontsize=7, ncol=3)
    else:  # every job failed: an empty plot, not a warning about an empty legend
        ax.text(0.5, 0.5, "no results", ha="center", va="center", transform=ax.transAxes)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _below_tick_labels(fig, ax) -> float:
    """The height, in axes coordinates, just under the x tick labels: a legend placed at a fixed
    offset ran into long (rotated) task names."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    bottom = min([t.get_window_extent(renderer).y0 for t in ax.get_xticklabels()], default=ax.bbox.y0)
    return float(ax.transAxes.inverted().transform((0, bottom))[1]) - 0.03


def plot_accuracy(rows: list[Row], tasks: list[str], path: Path, title: str = "",
                  drawn: PlotRecord | None = None) -> Path:
    """Per-task test accuracy of each method (and the references); ``drawn``: see :func:`kept_plot`."""
    shown = [i for i, r in enumerate(rows) if not r.failed]
    series = [(rows[i].method, [rows[i].acc.get(t, float("nan")) for t in tasks] + [rows[i].avg]) for i in shown]
    groups, slots = [*tasks, "avg"], (shown, len(rows))
    return kept_plot(drawn, path, {"plot": "accuracy", "groups": groups, "series": series, "title": title,
                                   "slots": slots},
                     lambda: grouped_bars(groups, series, "test top-1 (%)", path, legend_below=True, title=title,
                                          slots=slots))


def plot_robustness(rows: list[Row], corruptions: list[str], path: Path, title: str = "",
                    drawn: PlotRecord | None = None) -> Path:
    """Average accuracy over the robustness tasks, clean and per corruption, of each method;
    ``drawn``: see :func:`kept_plot`."""
    cols = ["clean", *corruptions]
    shown = [i for i, r in enumerate(rows) if "robust/clean/avg" in r.metrics]
    series = [(rows[i].method, [rows[i].metrics.get(f"robust/{c}/avg", float("nan")) for c in cols]) for i in shown]
    slots = (shown, len(rows))  # the main table's row numbers: a method's colour in accuracy.png
    return kept_plot(drawn, path, {"plot": "robustness", "groups": cols, "series": series, "title": title,
                                   "slots": slots},
                     lambda: grouped_bars(cols, series, "avg test top-1 (%)", path, legend_below=True, title=title,
                                          slots=slots))


def row_routings(cfg: SweepConfig, results: list[JobResult]) -> dict[str, dict[str, Any]]:
    """Routing statistics of each main-table row that has them (WeMoE's), of the setting the
    row reports (chosen on validation), by row label in the sweep's order."""
    out = {}
    for m in cfg.methods:
        cands = [r for r in results if r.label == m.display and r.status == "ok" and r.artifacts.get("routing")]
        if cands:
            out[m.display] = select_best(cands).artifacts["routing"]
    return out


# ---------------------------------------------------------------------------------------
# Reading a sweep back from MLflow


def _parse(value: str) -> Any:
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def load_sweep_from_mlflow(tracking_uri: str, run_id: str | None = None, sweep: SweepConfig | None = None,
                          folder: Path | None = None) -> tuple[SweepConfig, list[JobResult], Any]:
    """The sweep's resolved config and its jobs' results, from its parent run and nested runs.

    Without ``run_id`` the most recent sweep parent run in the store is used, one that
    ``harness sweep`` ran in before one only ``harness tune`` did (a single method's rows);
    with ``sweep``, only among that sweep's parent runs (its experiment and digest, as
    ``harness sweep`` finds its parent again): a store that other sweeps log to too holds theirs.
    ``folder``: ``sweep``'s output folder. A sweep of the same experiment in another folder logging
    to the same store shares its parent run and logs its own config and job list there last: the
    folder's own (``resolved.yaml``, ``report/jobs.json``) then say which jobs are this sweep's."""
    import tempfile

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    allow_folder_stores()
    check_reachable(tracking_uri)
    try:
        client = MlflowClient(tracking_uri)
        if run_id is None:
            where = "tags.`harness.kind` = 'sweep'"
            if sweep is None:
                exps = client.search_experiments()
            else:
                exp = client.get_experiment_by_name(sweep.experiment or sweep.name)
                exps = [exp] if exp is not None else []
                where += f" and tags.`{SWEEP_TAG}` = '{sweep.digest()}'"
            runs = client.search_runs([e.experiment_id for e in exps], where,
                                      max_results=1000, order_by=["attributes.start_time DESC"]) if exps else []
            if not runs:
                if sweep is not None:
                    raise HarnessError(f"{tracking_uri}: no sweep run of {sweep.experiment or sweep.name!r} "
                                       f"with its output folder's settings (harness.sweep_digest {sweep.digest()})")
                raise HarnessError(f"{tracking_uri}: no sweep runs found")
            parent = next((r for r in runs if r.data.tags.get(SCOPE_TAG, "sweep") == "sweep"), runs[0])
        else:
            parent = client.get_run(full_run_id(client, run_id))
            _refuse_job_run(client, tracking_uri, parent)
    except MlflowException as exc:
        raise HarnessError(f"{tracking_uri}: {exc.message}") from None
    unwritten = _no_tables_yet(client, tracking_uri, parent)
    if unwritten:
        raise HarnessError(unwritten)
    with tempfile.TemporaryDirectory() as tmp:
        local = _download(tracking_uri, parent, "resolved.yaml", tmp)
        cfg = SweepConfig.model_validate(yaml.safe_load(Path(local).read_text()))
    current: set[str] | None = None
    shared: dict[str, list[str]] = {}  # job key -> the labels whose rows hold it
    settings: dict[tuple[str, str], dict[str, Any]] = {}  # (label, key) -> the row's params
    if sweep is not None and folder is not None and cfg.output_dir != sweep.output_dir:
        cfg, entries = sweep, _folder_jobs(folder, parent, cfg.output_dir)
    else:
        entries = _recorded_jobs(client, tracking_uri, parent)
    if entries is not None:
        current = {e[1] if isinstance(e, list) else e for e in entries}  # [label, key]; older files: keys
        for e in entries:
            if isinstance(e, list):
                shared.setdefault(e[1], []).append(e[0])
            if isinstance(e, list) and len(e) > 3:
                settings[e[0], e[1]] = e[3]
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", max_results=50000)
    results = []
    for run in children:
        tags, params = run.data.tags, run.data.params
        if current is not None and tags.get(JOB_TAG) and tags[JOB_TAG] not in current:
            continue  # a job of an earlier state of the sweep's inputs
        job_params = {k[len("job.params."):]: _parse(v) for k, v in params.items() if k.startswith("job.params.")}
        artifacts: dict[str, Any] = {}
        test_correct: dict[str, str] = {}
        files = {a.path for a in run_artifacts(tracking_uri, run).list_artifacts()}
        with tempfile.TemporaryDirectory() as tmp:
            if tags.get("harness.kind") == "merge" and "routing.csv" in files:
                artifacts["routing"] = read_routing_csv(Path(_download(tracking_uri, run, "routing.csv", tmp)))
            if CORRECT_FILE in files:
                test_correct = read_correct(Path(_download(tracking_uri, run, CORRECT_FILE, tmp)))
        protocol = tags.get(PROTOCOL_TAG) or params.get("job.protocol") or MAIN
        results.append(JobResult(
            key=tags.get("harness.job_key", ""), kind=tags.get("harness.kind", "merge"),
            label=tags.get("harness.label", run.info.run_name), params=job_params, task=tags.get("harness.task"),
            status="ok" if run.info.status == "FINISHED" else "failed", metrics=dict(run.data.metrics),
            error=tags.get("harness.failure_reason"), artifacts=artifacts, protocol=protocol,
            test_correct=test_correct, study_error=tags.get(STUDY_FAILURE_TAG)))
    _refuse_unlogged(entries or [], {r.key for r in results}, tracking_uri, parent)
    results += [dataclasses.replace(r, label=label) for r in list(results)  # a job two labels share: one run
                for label in shared.get(r.key, []) if label != r.label]
    results = [dataclasses.replace(r, params=settings.get((r.label, r.key), r.params)) for r in results]
    return cfg, plan_order(cfg, results), parent


def _refuse_unlogged(entries: list[Any], logged: set[str], tracking_uri: str, parent: Any) -> None:
    """Refuse tables a job of which has no run under sweep run ``parent`` (deleted in MLflow): its
    row would be rebuilt from its other settings, whose best may not be the setting the row
    reports, as ``harness export`` refuses a row one of whose result files is gone."""
    gone = [(e[0], e[1]) for e in entries if isinstance(e, list) and e[1] not in logged]
    if not gone:
        return
    label, key = gone[0]
    more = f" (and {len(gone) - 1} more)" if len(gone) > 1 else ""
    raise HarnessError(f"{tracking_uri}: sweep run {parent.info.run_id} ({parent.info.run_name}): no run of job {key} "
                       f"(row {label!r}){more}, which its tables were built from (report/{JOBS_FILE}): deleted in "
                       "MLflow? The row cannot be rebuilt as the sweep reported it: rerun the sweep (its finished "
                       "jobs are cached, and it logs the job again), then report")


def _refuse_job_run(client: Any, tracking_uri: str, run: Any) -> None:
    """A job's run id (copied from the MLflow UI, where jobs are listed beside their sweep) is
    refused naming the sweep run to report instead of as a missing ``resolved.yaml``."""
    parent_id = run.data.tags.get("mlflow.parentRunId")
    if run.data.tags.get("harness.kind") == "sweep" or not parent_id:
        return
    parent = client.get_run(parent_id)
    raise HarnessError(f"{tracking_uri}: run {run.info.run_id} ({run.info.run_name}) is a job of sweep run "
                       f"{parent_id[:8]} ({parent.info.run_name}), not a sweep's run: report that one")


def full_run_id(client: Any, run_id: str) -> str:
    """The sweep run whose id begins with ``run_id`` (the tables' titles show its first 8
    characters), else ``run_id`` itself: a full id, or one MLflow then says it does not know."""
    if len(run_id) >= 32:
        return run_id
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, "tags.`harness.kind` = 'sweep'", max_results=50000) if exps else []
    found = sorted({r.info.run_id for r in runs if r.info.run_id.startswith(run_id)})
    if len(found) > 1:
        raise HarnessError(f"run id {run_id!r} begins {len(found)} sweep runs ({', '.join(found)}): give more of it")
    return found[0] if found else run_id


def _recorded_jobs(client: Any, tracking_uri: str, parent: Any) -> list[Any] | None:
    """The entries of the ``report/jobs.json`` sweep run ``parent`` logged (:func:`job_entry`);
    None where it logged none (a sweep of an older harness)."""
    import tempfile

    if not any(a.path == f"report/{JOBS_FILE}" for a in client.list_artifacts(parent.info.run_id, "report")):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        entries = job_entries(Path(_download(tracking_uri, parent, f"report/{JOBS_FILE}", tmp)).read_bytes())
    if entries is None:
        raise HarnessError(f"{tracking_uri}: sweep run {parent.info.run_id} ({parent.info.run_name}): its artifact "
                           f"report/{JOBS_FILE} is damaged (not the list of jobs a sweep writes): rerun the sweep "
                           "(its finished jobs are cached) to log it again")
    return entries


def _folder_jobs(folder: Path, parent: Any, other: str | None) -> list[list[Any]]:
    """The job entries output folder ``folder``'s sweep wrote (``report/jobs.json``), where sweep
    run ``parent`` was last logged to by the sweep of output folder ``other``."""
    path = folder / "report" / JOBS_FILE
    try:
        entries = job_entries(path.read_bytes())
    except OSError:
        entries = None
    if entries is None:
        other = other or f"outputs/{parent.info.run_name}"
        raise HarnessError(f"{path}: missing or damaged, and sweep run {parent.info.run_id} ({parent.info.run_name}) "
                           f"was last logged to by the sweep of output folder {other} (the same experiment): "
                           "rerun this folder's sweep (its finished jobs are cached)")
    return entries


def job_entries(data: bytes) -> list[list[Any]] | None:
    """The entries of a ``jobs.json`` (:func:`job_entry`), or None where ``data`` is not such a
    list (cut short by a killed writer of an older version, edited)."""
    try:
        entries = json.loads(data)
    except ValueError:  # not JSON, not UTF-8
        return None
    if not isinstance(entries, list) or not all(
            isinstance(e, list) and len(e) >= 2 and all(isinstance(x, str) for x in e[:2]) for e in entries):
        return None
    return entries


def _no_tables_yet(client: Any, tracking_uri: str, parent: Any) -> str | None:
    """Why sweep run ``parent`` has nothing to report, where its sweep has not reached its end: it
    logs ``resolved.yaml`` and its tables there. A report of a first sweep still running would
    otherwise say its artifacts are missing, as of a moved output folder. None when it has them."""
    status = parent.info.status
    if status == "FINISHED" or any(a.path == "resolved.yaml" for a in client.list_artifacts(parent.info.run_id)):
        return None
    state = ("still running (or was killed): report once it ends, or rerun it" if status == "RUNNING"
             else f"stopped before its end ({status}): rerun it")
    return (f"{tracking_uri}: sweep run {parent.info.run_id} ({parent.info.run_name}) has logged no tables yet: "
            f"its sweep is {state}")


def _download(tracking_uri: str, run: Any, path: str, dst: str) -> str:
    """A run's artifact ``path``, downloaded into ``dst``; one line naming the run and where its
    artifacts should lie when they are not there (a moved or deleted output folder)."""
    from mlflow.exceptions import MlflowException

    try:
        return run_artifacts(tracking_uri, run).download_artifacts(path, dst)
    except MlflowException as exc:
        raise HarnessError(f"{tracking_uri}: run {run.info.run_id} ({run.info.run_name}): cannot read its artifact "
                           f"{path!r} at {run.info.artifact_uri} ({last_line(exc.message, type(exc).__name__)})") from None


def run_artifacts(tracking_uri: str, run: Any) -> Any:
    """The artifact repository of ``run`` at the location the run found holds: MLflow's client
    looks a run up again (and its logged models) for every listing or download, 60 ms a job, a
    minute for a report of a thousand jobs."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    return get_artifact_repository(run.info.artifact_uri, tracking_uri=tracking_uri)


def load_study_counts(tracking_uri: str, parent: Any) -> dict[tuple[str, str], TrialCounts]:
    """The trial counts of the studies run under sweep run ``parent``, by the label of each one's
    method and the job key of its best setting on test (the row they go with): as the sweep's
    jobs.json recorded them, else (a sweep of an older harness) from the studies' tuning runs. A
    tuning run of an older harness, which stored none, adds nothing; of studies that chose the
    same job, the last to end counts."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    entries = _recorded_jobs(client, tracking_uri, parent) or []
    recorded = {(e[0], e[1]): TrialCounts(**e[2]) for e in entries if isinstance(e, list) and len(e) > 2 and e[2]}
    if recorded:
        return recorded
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                              "and tags.`harness.kind` = 'tune'", max_results=50000)
    out: dict[tuple[str, str], TrialCounts] = {}
    for run in sorted(runs, key=lambda r: r.info.end_time or 0):
        tags = run.data.tags
        if FINAL_KEY_TAG in tags and TRIALS_TAG in tags:
            counts = TrialCounts(int(tags[TRIALS_TAG]), int(tags.get(f"{TRIALS_TAG}.failed", 0)),
                                 int(tags.get(f"{TRIALS_TAG}.pruned", 0)))
            out[tags.get("harness.label", ""), tags[FINAL_KEY_TAG]] = counts
    return out


def plan_order(cfg: SweepConfig, results: list[JobResult]) -> list[JobResult]:
    """Results in the order the sweep planned them (ties in validation accuracy resolve alike)."""
    from harness.config import expand_grid

    kinds = {"pretrained": 0, "individual": 1, "perfect_routing": 2, "merge": 3, "robustness": 4}
    labels = {m.display: i for i, m in enumerate(cfg.methods)}
    grids = {m.display: expand_grid(m) for m in cfg.methods}
    tasks = {t: i for i, t in enumerate(cfg.task_names)}

    def key(r: JobResult) -> tuple:
        label = base_label(r.label) if r.protocol == GENERALIZATION else r.label
        grid = grids.get(label, [])
        setting = grid.index(r.params) if r.params in grid else len(grid)
        return (kinds.get(r.kind, 9), r.protocol == GENERALIZATION, tasks.get(r.task, -1), labels.get(label, -1),
                setting)

    return sorted(results, key=key)


def read_routing_csv(path: Path) -> dict[str, Any]:
    """Inverse of :func:`harness.plots.routing_csv`."""
    experts: list[str] = []
    weights: dict[str, dict[int, dict[str, float]]] = {}
    with open(path) as fh:
        for row in csv.DictReader(fh):
            if row["expert"] not in experts:
                experts.append(row["expert"])
            weights.setdefault(row["data_task"], {}).setdefault(int(row["layer"]), {})[row["expert"]] = float(row["mean_weight"])
    mean = {t: [[layers[li][e] for e in experts] for li in sorted(layers)] for t, layers in weights.items()}
    n_layers = len(next(iter(mean.values()))) if mean else 0
    return {"experts": experts, "layers": n_layers, "mean_weight": mean}
