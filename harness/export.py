"""``harness export``: the merged image encoder a results row reports, as a safetensors checkpoint.

A sweep's table names the setting each method was chosen at; researchers want that model
itself (to evaluate elsewhere, share, or merge again). The row's job is looked up in the
folder's ``report/jobs.json`` (the jobs the last tables were built from, a tuned method's best
setting included) and its merge is run again from the sweep's checkpoints: merges are
deterministic, and a test-time-adaptation method resumes from the adaptation its job saved in
``work/<key>/`` instead of adapting again. The file is an image-encoder state dict like the
fine-tuned checkpoints a sweep reads (``model.finetuned``), so it loads back as one.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.config import GENERALIZATION_SUFFIX, MAIN, SweepConfig, reference_row
from harness.errors import HarnessError
from harness.job import JobResult, read_result
from harness.plan import JobSpec, with_key
from harness.report import JOBS_FILE, job_entries
from harness.results import finished_settings, select_best

#: ``format`` in the file's safetensors metadata: an image-encoder state dict, or a whole CLIP's.
FORMAT = "harness.merged-image-encoder/1"
FORMAT_CLIP = "harness.merged-clip/1"


class ExportError(HarnessError):
    """Nothing to export, or a model that is no plain image encoder."""


@dataclass(frozen=True)
class Exported:
    path: Path
    result: JobResult  # the job whose model was written (its setting, key and metrics)
    adapted_again: bool  # a test-time-adaptation method found no saved adaptation and adapted anew
    saves_none: bool = False  # its job ran with checkpoint_every: 0: it saved no adaptation to resume


def chosen_result(cfg: SweepConfig, label: str) -> JobResult:
    """The job a finished sweep's row ``label`` reports: among the row's finished settings in the
    folder's last tables, the one with the best validation average, as the table chose it."""
    out = cfg.resolved_output_dir()
    jobs_file = out / "report" / JOBS_FILE
    if not jobs_file.is_file():
        raise ExportError(f"{jobs_file}: no such file: run `harness sweep` first (its tables name the jobs to export)")
    entries = _job_entries(jobs_file)
    pairs = [(e[0], e[1]) for e in entries]  # then a tuned row's trial counts, and the row's setting
    settings = {(e[0], e[1]): e[3] for e in entries if len(e) > 3 and isinstance(e[3], dict)}
    labels = sorted({row for row, _ in pairs if not reference_row(row)})
    keys = [key for row, key in pairs if row == label]
    if not keys:
        # a method added or renamed since the sweep last ran: its run builds the row (cached jobs are not run again)
        raise ExportError(f"{out}: no row {label!r} in the last results table (rows: {', '.join(labels) or 'none'}): "
                          "run `harness sweep` (its finished jobs are not run again) to build the table with it, "
                          "then export")
    # A result file holds the label and setting its job first ran under (a method renamed since, or
    # a job two labels share: a tuned best on another label's grid point, a default not in the
    # space then); the table counts it under this row, with the row's setting.
    results = [dataclasses.replace(r, label=label, params=settings.get((label, r.key), r.params))
               for r in (read_result(out / "results" / f"{k}.json", k) for k in dict.fromkeys(keys)) if r]
    finished = [r for r in finished_settings(results, label) if r.protocol == MAIN]
    if not finished:
        raise ExportError(_nothing_to_export(label, keys, out))
    gone = [k for k in dict.fromkeys(keys) if k not in {r.key for r in results} and not _failed(out, k)]
    if gone:  # the best of the others may not be the setting the row reports
        raise ExportError(f"{out / 'results' / f'{gone[0]}.json'}: missing or unusable, the result of a job of row "
                          f"{label!r} in the last results table: the setting the row reports cannot be told; "
                          "rerun the sweep (it runs that job again), then export")
    return select_best(finished)


def _failed(out: Path, key: str) -> bool:
    """Whether job ``key`` failed: a failed job keeps no result file, only its traceback."""
    from harness.runner import traceback_file

    return traceback_file(out, key).is_file()


def _job_entries(jobs_file: Path) -> list[list[Any]]:
    """The entries of ``report/jobs.json``: row label, job key, then a tuned row's trial counts and
    the row's setting; a file that is not such a list (cut short by a killed writer of an older
    version, edited) is one error naming it, not a traceback."""
    entries = job_entries(jobs_file.read_bytes())
    if entries is None:
        raise ExportError(f"{jobs_file}: damaged (not the list of jobs a sweep writes): rerun `harness sweep` "
                          "(its finished jobs are cached) to write it again")
    return entries


def _nothing_to_export(label: str, keys: list[str], out: Path) -> str:
    """Why row ``label`` has no model to export: "rerun the sweep" helps only where its jobs have
    not run; a generalization row's or a failed row's would not be there after a rerun either."""
    from harness.runner import traceback_file

    if label.endswith(GENERALIZATION_SUFFIX):
        return (f"row {label!r} is a generalization row, merged on the seen tasks only: export exports the "
                f"main table's rows (--method {label.removesuffix(GENERALIZATION_SUFFIX)!r})")
    tracebacks = [traceback_file(out, k) for k in dict.fromkeys(keys)]
    failed = [path for path in tracebacks if path.is_file()]
    if failed and len(failed) == len(tracebacks):
        lines = [line for line in failed[0].read_text(errors="replace").splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else "no reason recorded"
        return (f"row {label!r}: every setting failed ({len(failed)}; {reason}; {failed[0]}): nothing to export "
                "until one finishes")
    return f"row {label!r}: no finished setting in {out / 'results'}: rerun the sweep"


def refuse_another_format(dst: str | Path, full_clip: bool = False) -> None:
    """Refuse an ``--out`` named as a torch pickle checkpoint (``.pt``, ``.bin``, ...): the file is
    safetensors, which torch.load, and open_clip for any name not ending in ``.safetensors``, cannot read.
    A whole CLIP (``full_clip``) is for open_clip, whose loader tells safetensors by that suffix alone
    (case-sensitive), so its name must end in it."""
    from harness.checkpoints import CHECKPOINT_SUFFIXES

    suffix = Path(dst).suffix
    if suffix.lower() in CHECKPOINT_SUFFIXES and suffix.lower() != ".safetensors":
        raise ExportError(f"--out {str(dst)!r}: a {suffix} name says a torch pickle checkpoint, but export writes "
                          "safetensors: name it *.safetensors (e.g. --out merged.safetensors)")
    if full_clip and not str(dst).endswith(".safetensors"):
        raise ExportError(f"--out {str(dst)!r}: --full-clip writes safetensors, which open_clip reads only from a "
                          "name ending in .safetensors (any other it opens with torch.load): name it *.safetensors "
                          "(e.g. --out merged.safetensors)")


def export_merged(cfg: SweepConfig, label: str, dst: str | Path, device: torch.device | None = None,
                  full_clip: bool = False) -> Exported:
    """Write row ``label``'s merged image encoder to ``dst`` (safetensors, with the method, its
    setting, the job key and the checkpoints' digests in the metadata). ``full_clip``: the whole
    pretrained CLIP with the merged image tower (``visual.*``), a checkpoint open_clip's
    ``create_model(arch, pretrained=dst)`` and a sweep's ``model.pretrained`` load."""
    from harness.job import adaptation_lock, merge
    from harness.models import save_state_dict
    from harness.workspace import Workspace
    from methods.base import resolve_method

    refuse_another_format(dst, full_clip)
    refuse_a_record(dst, cfg)
    result = chosen_result(cfg, label)
    method = next((m for m in cfg.methods if m.display == label), None)
    if method is None:
        raise ExportError(f"row {label!r} is in the results but not among the sweep's methods "
                          f"({', '.join(m.display for m in cfg.methods)}): give the sweep file it ran from")
    if device is None:  # the sweep's device: an adaptation run again runs where the job ran
        device = _sweep_device(cfg)
    ws = Workspace(cfg)
    _refuse_an_input(dst, cfg, ws.sources)
    spec = with_key(cfg, JobSpec("merge", label, method=method.name, params=result.params),
                    ws.identity, ws.task_identity())
    if spec.key != result.key:
        raise ExportError(_stale(label, result, spec, method.name))
    workdir = cfg.resolved_output_dir() / "work" / spec.key
    cls = resolve_method(method.name)
    if not cls.plain_encoder:  # refused before merging: a lost adaptation would be run again first
        raise ExportError(_not_plain(label, "routed MLPs", workdir))
    with adaptation_lock(spec, workdir):  # what another export or the sweep's job saved there, once it is done
        saved = workdir.is_dir() and any(workdir.iterdir())
        merged, _ = merge(spec, ws, device, workdir)
    state = _plain_encoder_state(merged, ws.pretrained_encoder, label, workdir)
    if full_clip:
        state = {**{k: v.detach().cpu() for k, v in ws.clip.state_dict().items()},
                 **{f"visual.{k}": v for k, v in state.items()}}
    meta: dict[str, Any] = {
        "format": FORMAT_CLIP if full_clip else FORMAT, "arch": ws.sources["arch"],
        "open_clip_config": _arch_config(ws.sources["arch"]), "label": label, "method": method.name,
        "params": json.dumps(result.params, sort_keys=True), "job_key": spec.key,
        "pretrained_digest": ws.identity["pretrained"],
        "finetuned_digests": json.dumps({t: ws.identity["finetuned"][t] for t in cfg.seen_tasks(MAIN)}, sort_keys=True),
        "val_acc_avg": f"{result.metrics.get('val/acc/avg', float('nan')):.4f}",
        "test_acc_avg": f"{result.metrics.get('acc/avg', float('nan')):.4f}",
    }
    save_state_dict(state, dst, metadata=meta)
    saves_none = getattr(cls(**result.params), "checkpoint_every", None) == 0
    return Exported(Path(dst), result, adapted_again=cls.uses_test_data and not saved, saves_none=saves_none)


def _stale(label: str, result: JobResult, spec: JobSpec, method: str) -> str:
    """Why row ``label``'s job is not the one the sweep would run now: the inputs its result
    recorded that differ from the job's now, or for a result that recorded none, what may."""
    changed = [_input_name(part, method) for part in _changed_inputs(result.inputs, spec.inputs)]
    if not changed:
        return (f"row {label!r}: its reported job {result.key} was run with {_what_may_differ(method)} "
                f"than the sweep's now (key {spec.key}): rerun the sweep, then export")
    return (f"row {label!r}: its reported job {result.key} was run before {', '.join(changed)} changed "
            f"(key now {spec.key}): rerun the sweep, then export")


def _changed_inputs(then: dict[str, str], now: dict[str, str]) -> list[str]:
    """The key parts (:func:`harness.plan.key_inputs`) ``then`` and ``now`` differ in; none when
    ``then`` is empty (a result written before they were recorded). A task's checkpoint or identity
    only one side has is counted as the tasks merged (``merge_tasks``) changing."""
    if not then:
        return []
    return [k for k in sorted(then.keys() | now.keys()) if then.get(k) != now.get(k)
            and (not k.startswith(("finetuned.", "tasks.")) or (k in then and k in now))]


#: How a key part (:func:`harness.plan.key_inputs`) is named in a stale row's refusal.
_INPUT_NAMES = {"model.arch": "the architecture (model.arch)", "model.pretrained": "the pretrained checkpoint",
                "model.heads": "the classification heads", "params": "the method's params",
                "eval": "the evaluation settings (eval)", "adapt": "the adaptation settings (adapt)",
                "seed": "the seed", "merge_tasks": "the tasks merged", "robustness": "the robustness study's settings",
                "v": "the harness's result version", "tasks": "the tasks"}


def _input_name(part: str, method: str) -> str:
    """``part`` as the refusal names it: ``finetuned.emb_mnist`` is the fine-tuned checkpoint of emb_mnist."""
    from harness.imports import source_file
    from methods.base import resolve_method

    if part.startswith("finetuned."):
        return f"the fine-tuned checkpoint of {part.removeprefix('finetuned.')}"
    if part.startswith("tasks."):
        return f"task {part.removeprefix('tasks.')} (its data, prompts or code)"
    if part == "method":
        return f"the code of its method ({source_file(resolve_method(method))})"
    return _INPUT_NAMES.get(part, part)


def _what_may_differ(method: str) -> str:
    """What a stale row's job may have been run with: for a method of one's own, whose key holds
    its file's digest, also other code (the file edited since the sweep ran it)."""
    from harness.imports import source_file
    from harness.plan import method_class_id
    from methods.base import resolve_method

    if "@" not in method_class_id(method):
        return "other checkpoints, data or settings"
    return f"other code of its method ({source_file(resolve_method(method))}, if edited since), checkpoints, data or settings"


def _refuse_an_input(dst: str | Path, cfg: SweepConfig, sources: dict[str, Any]) -> None:
    """Refuse a ``dst`` that is one of the sweep's model files (as given, or converted), lies in a
    model folder it names, or in its cache folder: the export would replace what it merges."""
    from harness.model_checks import finetuned_field

    out = Path(dst).resolve()
    given = [cfg.model.pretrained, *(finetuned_field(cfg, t)[1] for t in cfg.task_names)]
    given = given if cfg.model.source == "files" else []
    inputs = [sources["pretrained"], *sources["finetuned"].values(), *sources["heads"].values(), *given]
    for path in dict.fromkeys(Path(p).resolve() for p in inputs if p and Path(p).exists()):
        if out == path or (path.is_dir() and out.is_relative_to(path)) or (out.exists() and out.samefile(path)):
            raise ExportError(f"{dst}: is one of the sweep's input models ({path}): the export would replace it; "
                              "write it elsewhere")
    cache = cfg.resolved_cache_dir().resolve()
    if out.is_relative_to(cache):
        raise ExportError(f"{dst}: lies in the sweep's cache folder ({cache}), whose models it reads; write it elsewhere")


#: What a sweep keeps in its output folder: files, and folders whose every file is the sweep's own.
RECORD_FILES = ("mlflow.db", "resolved.yaml")
RECORD_FOLDERS = ("results", "report", "artifacts", "work", "mlartifacts", "optuna", "slurm")


def refuse_a_record(dst: str | Path, cfg: SweepConfig) -> None:
    """Refuse a ``dst`` that is one of the records of the sweep's output folder (``mlflow.db``,
    ``resolved.yaml``, the lock file, or a path in one of its folders of results, tables, artifacts,
    adaptations, studies and submissions): the export would replace what the sweep, ``harness
    report`` and export itself read, or leave a file the sweep would take for its own. A new file
    elsewhere in the folder (``OUTPUT_DIR/exports/x.safetensors``) is no record and is written."""
    from harness.runner import LOCK_FILE

    folder = cfg.resolved_output_dir().resolve()
    out = Path(dst).resolve()
    files = [folder / name for name in (*RECORD_FILES, LOCK_FILE)]
    file = next((f for f in files if out == f or (out.exists() and f.exists() and out.samefile(f))), None)
    within = next((folder / d for d in RECORD_FOLDERS if out.is_relative_to(folder / d)), None)
    if file is None and within is None:
        return
    what = f"is the sweep's {file.name} ({file})" if file else f"lies in the sweep's records folder {within}"
    name = Path(dst).name if Path(dst).name.endswith(".safetensors") else "merged.safetensors"
    raise ExportError(f"{dst}: {what}, which the sweep, `harness report` and export read: writing "
                      f"there would replace or mix with the sweep's own files; write it elsewhere "
                      f"(e.g. {folder / 'exports' / name})")


def _sweep_device(cfg: SweepConfig) -> torch.device:
    """The sweep's ``device``; one a sweep run on a GPU names is missing on a machine without one,
    where the device=cpu override exports the same merge (device is no part of a job's key)."""
    from harness.runtime import resolve_device

    try:
        return resolve_device(cfg.device)
    except HarnessError as exc:
        raise ExportError(f"{exc}: export on this machine with the override device=cpu "
                          f"(harness export FILE device=cpu --method ... --out ...)") from None


def _arch_config(arch: str) -> str:
    """The open_clip config of ``arch`` as JSON: a generated ``hf-vit-...`` architecture is known
    only to the process that registered it, so the file carries it, as ``harness import``'s do
    (:func:`harness.models.resolve_arch` reads it from the header)."""
    from harness.models import open_clip_module

    return json.dumps(open_clip_module().get_model_config(arch), sort_keys=True)


def _plain_encoder_state(merged: torch.nn.Module, pretrained: torch.nn.Module, label: str,
                         workdir: Path) -> dict[str, torch.Tensor]:
    """``merged``'s state when it has the pretrained encoder's tensors (names and shapes); a model
    of another structure (WeMoE's routed MLPs) is refused, naming where its own file is."""
    state = merged.state_dict()
    want = {k: tuple(v.shape) for k, v in pretrained.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in state.items()}
    if got != want:
        extra, missing = sorted(set(got) - set(want)), sorted(set(want) - set(got))
        if extra:
            why = f"{len(extra)} tensors the architecture has not, e.g. {extra[0]}"
        elif missing:
            why = f"{len(missing)} of the architecture's tensors missing, e.g. {missing[0]}"
        else:
            name = min(k for k in got if got[k] != want[k])
            why = f"{name} of shape {list(got[name])}, the architecture's {list(want[name])}"
        raise ExportError(_not_plain(label, why, workdir))
    return {k: v.detach().cpu() for k, v in state.items()}


def _not_plain(label: str, why: str, workdir: Path) -> str:
    return (f"row {label!r}: its merged model is not a plain image encoder ({why}); a WeMoE job's adapted "
            f"model is {workdir / 'wemoe.safetensors'}, loaded with methods.wemoe.load_wemoe")
