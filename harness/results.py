"""The results table: reference rows, each method's val-selected setting, normalized accuracy."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any

from harness.job import JobResult


@dataclass
class Row:
    method: str
    setting: str
    acc: dict[str, float]
    avg: float
    norm: float | None
    val_avg: float | None = None
    n_settings: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


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


def setting_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def build_rows(results: list[JobResult], tasks: list[str], method_order: list[str]) -> list[Row]:
    indiv = individual_accuracy(results, tasks)
    rows: list[Row] = []
    for r in results:
        if r.kind == "pretrained" and r.status == "ok":
            acc = {t: r.metrics[f"acc/{t}"] for t in tasks}
            rows.append(Row("pretrained", "zero-shot", acc, r.metrics["acc/avg"],
                            normalized(r.metrics, indiv, tasks).get("norm_acc/avg")))
    if len(indiv) == len(tasks):
        avg = sum(indiv.values()) / len(tasks)
        rows.append(Row("individual", "per task", dict(indiv), avg, 100.0))
    bound = {r.task: r for r in results if r.kind == "perfect_routing" and r.status == "ok"}
    if len(bound) == len(tasks):
        acc = {t: bound[t].metrics[f"acc/{t}"] for t in tasks}
        metrics = {f"acc/{t}": a for t, a in acc.items()}
        rows.append(Row("perfect routing", setting_text(bound[tasks[0]].params) + " (bound)", acc,
                        sum(acc.values()) / len(tasks), normalized(metrics, indiv, tasks).get("norm_acc/avg")))
    for label in method_order:
        cands = [r for r in results if r.kind == "merge" and r.label == label and r.status == "ok"]
        if not cands:
            continue
        best = max(cands, key=lambda r: r.metrics.get("val/acc/avg", float("-inf")))
        acc = {t: best.metrics[f"acc/{t}"] for t in tasks}
        rows.append(Row(label, setting_text(best.params), acc, best.metrics["acc/avg"],
                        normalized(best.metrics, indiv, tasks).get("norm_acc/avg"),
                        best.metrics.get("val/acc/avg"), len(cands)))
    return rows


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def table_records(rows: list[Row], tasks: list[str]) -> tuple[list[str], list[list[str]]]:
    header = ["method", "setting", *tasks, "avg", "norm avg"]
    body = [[r.method, r.setting, *[_fmt(r.acc.get(t)) for t in tasks], _fmt(r.avg), _fmt(r.norm)] for r in rows]
    return header, body


def to_markdown(rows: list[Row], tasks: list[str]) -> str:
    header, body = table_records(rows, tasks)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[Row], tasks: list[str]) -> str:
    header = ["method", "setting", *tasks, "avg", "norm_avg", "val_avg", "n_settings"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for r in rows:
        w.writerow([r.method, r.setting, *[f"{r.acc[t]:.4f}" for t in tasks], f"{r.avg:.4f}",
                    "" if r.norm is None else f"{r.norm:.4f}", "" if r.val_avg is None else f"{r.val_avg:.4f}",
                    r.n_settings])
    return buf.getvalue()


def to_rich(rows: list[Row], tasks: list[str], title: str = "results (test top-1 %, settings chosen on val)"):
    from rich.table import Table

    header, body = table_records(rows, tasks)
    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 2 else "right", style="bold" if h == "avg" else None,
                         no_wrap=i == 0)
    for r in body:
        table.add_row(*r)
    return table
