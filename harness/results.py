"""The results tables: reference rows, each method's val-selected setting, normalized accuracy;
and the ``generalization`` block's table from its own jobs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from harness.config import GENERALIZATION, bound_label, reference_row
from harness.job import JobResult
from harness.plan import base_label, generalization_label, setting_text


@dataclass
class Row:
    method: str
    setting: str
    acc: dict[str, float]
    avg: float | None  # None: every job behind the row failed (its setting says "failed")
    norm: float | None
    val_avg: float | None = None
    n_settings: int = 1
    metrics: dict[str, float] = field(default_factory=dict)  # the chosen job's metrics (robust/..., unseen/...)
    extra: dict[str, Any] = field(default_factory=dict)
    test_correct: dict[str, str] = field(default_factory=dict)  # task -> packed per-image test correctness
    robustness_failed: bool = False  # the chosen setting's robustness study failed (in its job or a follow-up)

    @property
    def failed(self) -> bool:
        return self.avg is None


FAILED = "failed"


@dataclass(frozen=True)
class TrialCounts:
    """A study's finished trials, for its tuned row: a best setting says little without how
    many trials it was chosen among and how many of them failed or were pruned."""

    total: int
    failed: int = 0
    pruned: int = 0

    def note(self) -> str:
        """As a grid's row words its failed settings: "2 of 20 trials failed, 3 pruned"; empty
        when every trial completed."""
        if self.failed:
            return f"{self.failed} of {self.total} trials failed" + (f", {self.pruned} pruned" if self.pruned else "")
        return f"{self.pruned} of {self.total} trials pruned" if self.pruned else ""


def individual_accuracy(results: list[JobResult], tasks: list[str]) -> dict[str, float]:
    out = {}
    for r in results:
        if r.kind == "individual" and r.status == "ok":
            out[r.task] = r.metrics[f"acc/{r.task}"]
    return {t: out[t] for t in tasks if t in out}


def normalized(metrics: dict[str, float], individual: dict[str, float], tasks: list[str],
               prefix: str = "acc") -> dict[str, float]:
    """norm_acc/<task> = merged / individual accuracy, and their mean (when all are known)."""
    out = {}
    for t in tasks:
        if t in individual and individual[t] > 0 and f"{prefix}/{t}" in metrics:
            out[f"norm_{prefix}/{t}"] = metrics[f"{prefix}/{t}"] / individual[t] * 100.0
    if len(out) == len(tasks):
        out[f"norm_{prefix}/avg"] = sum(out.values()) / len(tasks)
    return out


def build_rows(results: list[JobResult], tasks: list[str], method_order: list[str],
               seen: list[str] | None = None,
               studies: Mapping[tuple[str, str], TrialCounts] | None = None) -> list[Row]:
    """Reference rows, then each method's setting with the best validation average.

    ``tasks`` are every evaluated task; averages and normalized accuracy are over ``seen``
    (the merged tasks; all tasks unless the sweep has unseen ones). A row whose jobs all failed
    is kept, its setting ``failed`` and its accuracy missing (a table that dropped it would read
    as if the method had not been run); a grid with some failed settings says how many.
    ``studies``: a tuned method's trial counts by its label and the key of its best setting's
    job (another method's grid may hold that job too), which its row says as a grid's says its
    failed settings."""
    seen = seen or tasks
    studies = studies or {}
    indiv = individual_accuracy(results, tasks)
    rows: list[Row] = []

    def accs(r: JobResult) -> dict[str, float]:
        return {t: r.metrics[f"acc/{t}"] for t in tasks if f"acc/{t}" in r.metrics}

    def failed_of(kind: str) -> list[JobResult]:
        return [r for r in results if r.kind == kind and r.status == "failed"]

    for r in results:
        if r.kind == "pretrained" and r.status == "ok":
            acc = accs(r)  # averaged here: one pretrained job serves every protocol's seen tasks
            avg = _mean_of(acc, seen) if all(t in acc for t in seen) else r.metrics["acc/avg"]
            rows.append(Row("pretrained", "zero-shot", acc, avg,
                            normalized(r.metrics, indiv, seen).get("norm_acc/avg"), metrics=r.metrics,
                            test_correct=r.test_correct, robustness_failed=bool(r.study_error)))
    if not any(r.method == "pretrained" for r in rows) and failed_of("pretrained"):
        rows.append(Row("pretrained", FAILED, {}, None, None))
    if all(t in indiv for t in seen):
        rows.append(Row("individual", "per task", dict(indiv), _mean_of(indiv, seen), 100.0,
                        test_correct=_per_task_correct(r for r in results if r.kind == "individual" and r.status == "ok")))
    elif lost := _failed_tasks(failed_of("individual"), indiv, tasks):
        rows.append(Row("individual", f"{FAILED}: {', '.join(lost)}", dict(indiv), None, None))
    routed = [r for r in results if r.kind == "perfect_routing"]
    scalings = sorted({r.params["scaling"] for r in routed})  # one bound row each, in one order whatever read them
    for scaling in scalings:
        name = bound_label(scaling, len(scalings) > 1)
        at = [r for r in routed if r.params["scaling"] == scaling]
        bound = {r.task: r for r in at if r.status == "ok"}
        if all(t in bound for t in seen):
            acc = {t: bound[t].metrics[f"acc/{t}"] for t in seen}
            metrics = {f"acc/{t}": a for t, a in acc.items()}
            rows.append(Row(name, setting_text(bound[seen[0]].params) + " (bound)", acc,
                            _mean_of(acc, seen), normalized(metrics, indiv, seen).get("norm_acc/avg"),
                            test_correct=_per_task_correct(bound[t] for t in seen)))
        elif lost := _failed_tasks([r for r in at if r.status == "failed"], bound, tasks):
            acc = {t: b.metrics[f"acc/{t}"] for t, b in bound.items()}
            rows.append(Row(name, f"{FAILED}: {', '.join(lost)}", acc, None, None))
    for label in method_order:
        cands = finished_settings(results, label)
        failed = [r for r in results if r.kind == "merge" and r.label == label and r.status == "failed"]
        if not cands:
            if failed:
                rows.append(Row(label, FAILED if len(failed) == 1 else f"{FAILED} ({len(failed)} settings)",
                                {}, None, None, n_settings=0))
            continue
        best = select_best(cands)
        metrics = dict(best.metrics)
        robustness_failed = bool(best.study_error)  # the study it ran itself failed
        for r in results:  # a grid method's robustness study ran once, for this setting, in its own job
            if r.kind == "robustness" and r.label == label and r.params == best.params:
                if r.status == "ok":
                    metrics.update(r.metrics)
                else:
                    robustness_failed = True
        setting = setting_text(best.params)
        note = f"{len(failed)} of {len(failed) + len(cands)} settings failed" if failed else ""
        if (label, best.key) in studies:
            note = studies[label, best.key].note()
        if note:
            setting = f"{setting} ({note})" if setting else note
        rows.append(Row(label, setting, accs(best), best.metrics["acc/avg"],
                        normalized(best.metrics, indiv, seen).get("norm_acc/avg"),
                        best.metrics.get("val/acc/avg"), len(cands), metrics=metrics,
                        test_correct=best.test_correct,
                        robustness_failed=robustness_failed and "robust/clean/avg" not in metrics))
    return rows


def _failed_tasks(failed: list[JobResult], finished: dict[str, Any], tasks: list[str]) -> list[str]:
    """The tasks of a per-task row (individual, perfect routing) whose job failed, in task order."""
    lost = {r.task for r in failed} - set(finished)
    return [t for t in tasks if t in lost]


def _per_task_correct(results) -> dict[str, str]:
    """A row assembled from one job per task (individual, perfect routing): each job's own task."""
    return {r.task: r.test_correct[r.task] for r in results if r.task in r.test_correct}


def finished_settings(results: list[JobResult], label: str) -> list[JobResult]:
    """The merge jobs of method ``label`` (one per setting) that finished."""
    return [r for r in results if r.kind == "merge" and r.label == label and r.status == "ok"]


#: Decimal places validation averages are compared at: an average of per-task percentages summed in
#: another order (two settings whose task accuracies differ yet average the same) differs in its
#: last bit, far below any real difference (100 / (images x tasks): 1e-4 points for 20 tasks of
#: 50,000 images), and the later setting of an exact tie would be chosen about one time in four.
VAL_DECIMALS = 9


def select_best(candidates: list[JobResult]) -> JobResult:
    """The setting a table reports: the best validation average (the first of equals, equal but
    for floating-point rounding included)."""
    return max(candidates, key=lambda r: round(r.metrics.get("val/acc/avg", float("-inf")), VAL_DECIMALS))


def generalization_rows(results: list[JobResult], tasks: list[str], method_order: list[str],
                        seen: list[str]) -> list[Row]:
    """The ``generalization`` block's rows: the zero-shot pretrained model, then each method's
    generalization job with the best validation average over ``seen`` (its own jobs' val/acc/avg).

    Rows carry the method's own label; individual and perfect-routing rows are left out (a
    model fine-tuned on a task has seen it)."""
    refs = [r for r in results if r.kind in ("pretrained", "individual")]
    gen = [r for r in results if r.kind == "merge" and r.protocol == GENERALIZATION]
    rows = build_rows(refs + gen, tasks, [generalization_label(m) for m in method_order], seen)
    out = []
    for row in rows:
        if row.method == "individual":  # kept above only so that the rows' normalized accuracy exists
            continue
        row.method = base_label(row.method)
        out.append(row)
    return out


def generalization_table_records(rows: list[Row], tasks: list[str],
                                 seen: list[str]) -> tuple[list[str], list[list[str]]]:
    """The generalization block's table: seen tasks, their average (and normalized average),
    then the unseen tasks and their average."""
    header, body = table_records(rows, tasks, seen)
    header = ["seen avg" if h == "avg" else "seen norm avg" if h == "norm avg" else h for h in header]
    return header, body


def _mean_of(values: dict[str, float], keys: list[str]) -> float:
    return sum(values[k] for k in keys) / len(keys)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def table_records(rows: list[Row], tasks: list[str], seen: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    seen = seen or tasks
    unseen = [t for t in tasks if t not in seen]
    header = ["method", "setting", *seen, "avg", "norm avg"]
    if unseen:
        header += [f"{t} (unseen)" for t in unseen] + ["unseen avg"]
    body = []
    for r in rows:
        line = [r.method, r.setting, *[_fmt(r.acc.get(t)) for t in seen], _fmt(r.avg), _fmt(r.norm)]
        if unseen:
            vals = [r.acc.get(t) for t in unseen]
            line += [_fmt(v) for v in vals]
            line.append(_fmt(sum(vals) / len(vals)) if all(v is not None for v in vals) else "-")
        body.append(line)
    return header, body


def robustness_records(rows: list[Row], corruptions: list[str]) -> tuple[list[str], list[list[str]]]:
    """Average accuracy over the robustness tasks: clean and per corruption. A method whose
    study failed (its job, or the follow-up job of its chosen setting) shows ``failed``."""
    header = ["method", "clean", *corruptions]
    body = []
    for r in rows:
        if "robust/clean/avg" in r.metrics:
            body.append([r.method, _fmt(r.metrics["robust/clean/avg"]),
                         *[_fmt(r.metrics.get(f"robust/{c}/avg")) for c in corruptions]])
        elif r.robustness_failed or (r.failed and (r.method == "pretrained" or not reference_row(r.method))):
            body.append([r.method, *[FAILED] * (1 + len(corruptions))])
    return header, body


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    """A Markdown table; a ``|`` inside a cell (a setting's string value) is escaped, not a column."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *map(line, body)]) + "\n"


def rich_table(header: list[str], body: list[list[str]], title: str):
    from rich.table import Table

    table = Table(title=title)
    for i, h in enumerate(header):  # too narrow, a column folds its header onto more lines: never `many…`
        table.add_column(h, justify="left" if h in ("method", "setting") else "right",
                         style="bold" if h == "avg" else None, no_wrap=i == 0, overflow="fold")
    for r in body:
        table.add_row(*r)
    return table


def print_table(console: Any, table: Any) -> None:
    """Print ``table``; where the output is not a terminal (a log, a pipe) as wide as its columns
    need, whatever the console's width: twenty task columns do not fit 200 characters."""
    from rich.measure import Measurement

    need = Measurement.get(console, console.options.update_width(10**6), table).maximum
    if console.is_terminal or need <= console.width:
        console.print(table)
        return
    width = console.width
    console.width = need
    try:
        console.print(table)
    finally:
        console.width = width


def to_rich(rows: list[Row], tasks: list[str], seen: list[str] | None = None,
            title: str = "results (test top-1 %, settings chosen on val)"):
    return rich_table(*table_records(rows, tasks, seen), title=title)
