"""Entropy-minimisation test-time adaptation, shared by AdaMerging and WeMoE.

The loop trains the parameters of ``model`` that require grad so that the summed (over
tasks) mean Shannon entropy of ``softmax(ImageClassifier(model, ctx.heads[task])(x))`` on
unlabeled test batches falls. Each step draws one batch per task from
``ctx.unlabeled[task]()`` (the iterator is re-created when exhausted).

Conventions the callers rely on:

* Progress: ``ctx.progress`` None (or falsy) means silent. A live ``rich.progress.Progress``
  (anything with ``add_task``/``update``) gets one task added to it; any other callable is a
  factory called with no arguments that returns such a Progress, used as a context manager;
  any other truthy value shows a transient rich progress bar of our own (lines at every tenth
  when the output is not a terminal). The bar shows the current loss.
* Checkpoints: every ``checkpoint_every`` steps and at the end, the trainable tensors, the
  step, the Adam state (and under fp16 the loss scaler's), the loss history and
  ``ctx.adapted_on`` (the data adapted on) go to
  ``ctx.workdir/<name>-tta.pt`` (:func:`harness.cache.atomic_write_bytes`; tensors and plain containers only,
  read back with ``weights_only=True``). A run that finds that file resumes from it and
  fast-forwards every task's iterator past the batches already consumed, so resuming
  reproduces an uninterrupted run exactly when the iterator factories are deterministic; a
  file adapted on other data (another corruption or severity) is refused, not resumed; one of
  more steps than asked for holds a later step's weights and is not resumed either (the run
  adapts from the start and replaces it at its first checkpoint).
* Loss parts: ``ctx.artifacts["tta_parts"]`` holds, per step, the summed entropy
  (``"entropy"``), with ``diversity_weight`` > 0 the summed ``-diversity_weight`` x marginal
  entropy of each task's batch (``"diversity"``), and the ``aux_loss`` term (under
  ``aux_name``); they add up to the returned loss. Steps of a checkpoint written before parts were recorded have none: the parts are
  then ``[step, value]`` pairs from the first step run here.
* Validation: before the first step, every ``eval_every`` steps and after the last step (so
  the adapted model is scored when ``eval_every`` does not divide ``steps``), if ``ctx.validate`` is
  set, it is called on ``export()`` (default: the model itself) under ``torch.no_grad``; the
  metrics, plus (after a step) the last step's summed entropy as ``tta_entropy`` and its whole
  loss as ``tta_loss`` (the same without ``aux_loss``; with it, its term added), go to
  ``ctx.report(step, metrics)`` (True from it raises :class:`methods.base.PruneTrial`) and,
  with their step, to ``ctx.artifacts["tta_validation"]`` (kept in the checkpoint), so a
  sweep's runs show whether adaptation helped on validation, not only the loss.

Precision: the forward passes run under ``ctx.autocast()`` (the sweep's ``eval.precision``);
the trainable parameters stay float32 (the optimizer updates them there), and the loss (entropy
of float32 logits, the auxiliary term) is computed in float32 outside autocast.

``joint_forward=True`` concatenates the tasks' batches into one encoder forward and one
backward (right for models whose samples do not interact, and cheapest when the forward
rebuilds weights, as AdaMerging's does). ``joint_forward=False`` runs forward and backward
per task and accumulates gradients (the same gradient; activation memory bounded by one task,
which matters for WeMoE's per-sample weights and for ``batch_reduce`` whose routing must
average over one task's batch only).
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import math
import os
import pickle
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harness.cache import atomic_write_bytes, remove_stale_temporaries
from harness.failpoints import failpoint
from harness.models import ImageClassifier
from methods.base import MergeContext, PruneTrial


def per_sample_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of the softmax of each row of ``logits``."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of the softmax of each row of ``logits``: the adaptation loss."""
    return per_sample_entropy(logits).mean()


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of the batch's mean prediction (logits ``[..., images, classes]``,
    one value per leading index): high when a batch's predictions spread over the classes.
    Minimising entropy alone also rewards predicting one class for every image confidently;
    maximising this as well (information maximisation, as SHOT does) does not."""
    mean = F.softmax(logits.float(), dim=-1).mean(-2)
    return -(mean * mean.clamp_min(1e-12).log()).sum(-1)


def _images(batch: Any) -> torch.Tensor:
    """A batch may be a tensor or a tuple/list whose first item is the images."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"unlabeled batches must be image tensors, got {type(batch).__name__}")
    return batch


class BatchStream:
    """An endless stream of image batches from an iterator factory (re-created when exhausted)."""

    def __init__(self, factory: Callable[[], Iterator[Any]], name: str = ""):
        self.factory = factory
        self.name = name
        self._it: Iterator[Any] | None = None

    def __next__(self) -> torch.Tensor:
        for fresh in (False, True):
            if self._it is None or fresh:
                self._it = iter(self.factory())
            try:
                return _images(next(self._it))
            except StopIteration:
                continue
        raise ValueError(f"unlabeled data of task {self.name!r} yields no batches")

    def skip(self, n: int) -> None:
        """Move past ``n`` batches; a stream with its own ``skip`` (the harness's) does so
        without reading them."""
        if self._it is None:
            self._it = iter(self.factory())
        if callable(getattr(self._it, "skip", None)):
            self._it.skip(n)
            return
        for _ in range(n):
            next(self)


def checkpoint_path(workdir: str | os.PathLike, name: str) -> Path:
    return Path(workdir) / f"{name}-tta.pt"


def _save_checkpoint(path: Path, params: Mapping[str, nn.Parameter], step: int,
                     optimizer: torch.optim.Optimizer, losses: Sequence[float],
                     validation: Sequence[dict[str, float]] = (), parts: "_Parts | None" = None,
                     adapted_on: Mapping[str, Any] | None = None,
                     scaler: "torch.amp.GradScaler | None" = None) -> None:
    state = {
        "step": step,
        "params": {k: p.detach().cpu().clone() for k, p in params.items()},
        "optimizer": optimizer.state_dict(),
        "losses": torch.tensor(list(losses), dtype=torch.float64),
        "validation": [dict(v) for v in validation],
        "adapted_on": dict(adapted_on or {}),
    }
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if parts is not None:
        state["parts_start"] = parts.start
        state["parts"] = {k: torch.tensor(v, dtype=torch.float64) for k, v in parts.values.items()}
    buffer = io.BytesIO()  # serialised first: a refused write is an OSError naming the file, not torch's stream error
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())  # a failed or killed write leaves the last checkpoint, whole


class UnreadableCheckpoint(Exception):
    """A checkpoint file that is not a whole adaptation checkpoint (cut short, hand-damaged)."""


class CheckpointAhead(Exception):
    """A checkpoint of more steps than the run asks for: its weights are a later step's."""


def _load_checkpoint(path: Path, params: Mapping[str, nn.Parameter], optimizer: torch.optim.Optimizer,
                     adapted_on: Mapping[str, Any] | None = None, scaler: "torch.amp.GradScaler | None" = None,
                     max_step: int | None = None) -> tuple[int, list[float], list[dict[str, float]], "_Parts"]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not {"step", "params", "optimizer", "losses"} <= set(state):
            raise ValueError("not an adaptation checkpoint")
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, OSError) as exc:  # truncated, hand-damaged
        if isinstance(exc, OSError) and exc.errno not in (None, errno.EINVAL):  # unreadable file, not content
            raise
        raise UnreadableCheckpoint(f"{path}: unreadable adaptation checkpoint ({exc})") from exc
    was = dict(state.get("adapted_on") or {})
    now = dict(adapted_on or {})
    if was and now and was != now:  # e.g. a checkpoint copied from another corruption's workdir
        raise ValueError(f"{path}: checkpoint adapted on {was}, this adaptation reads {now}; "
                         "delete it to adapt from the start")
    saved = state["params"]
    if set(saved) != set(params) or any(saved[k].shape != p.shape for k, p in params.items()):
        raise ValueError(f"{path}: checkpoint does not match the model's trainable parameters")
    if max_step is not None and int(state["step"]) > max_step:  # checked before anything is loaded into the model
        raise CheckpointAhead(f"{path}: checkpoint at step {int(state['step'])}, ahead of the {max_step} steps "
                              "asked for")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    validation = [{k: float(v) for k, v in row.items()} for row in state.get("validation", [])]
    step = int(state["step"])
    if "parts" in state:
        parts = _Parts(int(state["parts_start"]), {k: [float(x) for x in v] for k, v in state["parts"].items()})
    else:  # written before parts were recorded: they start at the first step run now
        parts = _Parts(step)
    return step, [float(v) for v in state["losses"]], validation, parts


class _Parts:
    """Per-step loss parts by name, from step ``start`` on."""

    def __init__(self, start: int = 0, values: dict[str, list[float]] | None = None):
        self.start, self.values = start, values or {}

    def append(self, parts: Mapping[str, float]) -> None:
        for k, v in parts.items():
            self.values.setdefault(k, []).append(v)

    def series(self) -> dict[str, list]:
        """Dense lists (index = step) from step 0, else ``[step, value]`` pairs."""
        if self.start == 0:
            return {k: list(v) for k, v in self.values.items()}
        return {k: [[self.start + i, x] for i, x in enumerate(v)] for k, v in self.values.items()}


@contextlib.contextmanager
def _progress(ctx: MergeContext, description: str, total: int, start: int):
    """Yields ``update(completed, loss, parts)``; silent when ``ctx.progress`` is falsy. The bar
    shows the loss, and its parts when there is more than one."""
    spec = ctx.progress
    if not spec:
        yield lambda completed, loss, parts: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

    from harness.progress import progress_bars

    if hasattr(spec, "add_task") and hasattr(spec, "update"):
        owner = contextlib.nullcontext(spec)
    elif callable(spec):
        owner = spec()
    else:
        owner = progress_bars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), transient=True)
    with owner as bar:
        task = bar.add_task(description, total=total, completed=start, loss="-")
        try:
            yield lambda completed, loss, parts: bar.update(task, completed=completed, loss=_loss_text(loss, parts))
        finally:
            if hasattr(bar, "remove_task"):
                bar.remove_task(task)


def _description(name: str, adapted_on: Mapping[str, Any] | None) -> str:
    """``wemoe``, or ``wemoe [gaussian_noise 2]`` for an adaptation on corrupted images: a
    robustness study's per-corruption adaptations are told apart on their progress lines."""
    corruption = (adapted_on or {}).get("corruption")
    if not corruption:
        return name
    severity = (adapted_on or {}).get("severity")
    return f"{name} [{corruption}{'' if severity is None else f' {severity}'}]"


def _loss_text(loss: float, parts: Mapping[str, float]) -> str:
    """``0.1234``, or ``0.1234 (entropy 0.1000 + task_id 0.0234)`` when the loss has several parts."""
    text = f"{loss:.4f}"
    if len(parts) > 1:
        text += " (" + " + ".join(f"{k} {v:.4f}" for k, v in parts.items()) + ")"
    return text


def run_tta(
    model: nn.Module,
    ctx: MergeContext,
    *,
    lr: float,
    steps: int,
    cosine: bool = False,
    checkpoint_every: int = 0,
    eval_every: int = 0,
    joint_forward: bool = False,
    export: Callable[[], nn.Module] | None = None,
    aux_loss: Callable[[str], torch.Tensor] | None = None,
    aux_name: str = "aux",
    diversity_weight: float = 0.0,
    name: str = "tta",
) -> list[float]:
    """Adapt ``model``'s trainable parameters in place; returns the loss of every step.

    The tasks are ``ctx.tasks`` (the heads); each needs an ``ctx.unlabeled`` factory.
    Adam with ``lr``, optionally cosine-annealed to 0 over ``steps``. ``aux_loss(task)``, when
    given, is called right after the forward of ``task``'s batch and its value is added to the
    loss (per-task forwards only: ``joint_forward`` must be False); its per-step values are
    reported as the loss part ``aux_name``. ``diversity_weight`` > 0 subtracts that multiple of
    each task batch's :func:`marginal_entropy` (0: the papers' objective, entropy alone).
    """
    if aux_loss is not None and joint_forward:
        raise ValueError("aux_loss needs per-task forwards (joint_forward=False)")
    tasks = ctx.tasks
    if steps <= 0:  # nothing to adapt: the parts and validation of no step, as callers read them
        ctx.artifacts["tta_parts"], ctx.artifacts["tta_validation"] = {}, []
        return []
    if not tasks:
        raise ValueError("test-time adaptation needs at least one task head in the context")
    missing = [t for t in tasks if t not in ctx.unlabeled]
    if missing:
        raise ValueError(f"no unlabeled data for tasks {missing}")
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("the model has no trainable parameters to adapt")
    device = ctx.device
    heads = {t: ctx.heads[t].to(device) for t in tasks}
    classifiers = {t: ImageClassifier(model, heads[t]) for t in tasks}
    streams = {t: BatchStream(ctx.unlabeled[t], t) for t in tasks}
    optimizer = torch.optim.Adam(list(params.values()), lr=lr)
    # fp16 gradients below ~6e-8 flush to zero on their way back through the half-precision
    # forward: the loss is scaled up for the backward and the gradients unscaled before Adam's
    # step (a step whose gradients overflowed is skipped and the scale lowered), as torch.amp does.
    scaler = torch.amp.GradScaler(device.type) if ctx.precision == "fp16" else None

    start, losses, validation, parts = 0, [], [], _Parts()
    ckpt = checkpoint_path(ctx.workdir, name) if ctx.workdir else None
    if ckpt is not None:
        remove_stale_temporaries(ckpt)  # a killed run's half-written checkpoint: never renamed, never read
    if ckpt is not None and ckpt.is_file():
        try:
            start, losses, validation, parts = _load_checkpoint(ckpt, params, optimizer, ctx.adapted_on, scaler,
                                                                max_step=steps)
        except UnreadableCheckpoint as exc:  # adapting from the start gives the uninterrupted run's result
            logging.getLogger("harness").warning(f"{exc}; adapting from the start")
            ckpt.unlink(missing_ok=True)
        except CheckpointAhead as exc:  # kept until this run's first checkpoint replaces it
            logging.getLogger("harness").warning(f"{exc}; adapting from the start")
        for s in streams.values():
            s.skip(start)
    ctx.artifacts["tta_validation"] = validation

    def validate(done: int) -> None:
        if eval_every <= 0 or ctx.validate is None:
            return
        with torch.no_grad():
            metrics = dict(ctx.validate(export() if export else model))
        if losses:  # the last step's: its summed entropy, and the whole loss (with aux_loss's term)
            metrics["tta_entropy"] = parts.values["entropy"][-1]
            metrics["tta_loss"] = losses[-1]
        validation.append({"step": float(done), **metrics})
        if ctx.report is not None and ctx.report(done, metrics):
            raise PruneTrial(f"{name}: pruned at step {done}")

    was_training = model.training
    model.eval()
    try:
        with _progress(ctx, _description(name, ctx.adapted_on), steps, start) as update:
            if start == 0:
                validate(0)
            for step in range(start, steps):
                if cosine:
                    for group in optimizer.param_groups:
                        group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
                optimizer.zero_grad(set_to_none=True)
                batches = {t: next(streams[t]).to(device) for t in tasks}
                step_parts = _entropy_step(model, classifiers, heads, batches, joint_forward, aux_loss, aux_name,
                                           diversity_weight, ctx.autocast,
                                           (lambda t: scaler.scale(t).backward()) if scaler else torch.Tensor.backward)
                loss = sum(step_parts.values())
                if not math.isfinite(loss):  # a diverged adaptation is a failed job, never a result
                    raise FloatingPointError(f"{name}: adaptation loss is not finite at step {step + 1}")
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                losses.append(loss)
                parts.append(step_parts)
                done = step + 1
                update(done, loss, step_parts)
                if eval_every > 0 and (done % eval_every == 0 or done == steps):
                    validate(done)
                if ckpt is not None and checkpoint_every > 0 and (done % checkpoint_every == 0 or done == steps):
                    _save_checkpoint(ckpt, params, done, optimizer, losses, validation, parts, ctx.adapted_on, scaler)
                failpoint("tta_step")
    finally:
        model.train(was_training)
        ctx.artifacts["tta_parts"] = parts.series()
    return losses


def _entropy_step(model: nn.Module, classifiers: Mapping[str, ImageClassifier],
                  heads: Mapping[str, torch.Tensor], batches: Mapping[str, torch.Tensor],
                  joint_forward: bool, aux_loss: Callable[[str], torch.Tensor] | None = None,
                  aux_name: str = "aux", diversity_weight: float = 0.0,
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                  backward: Callable[[torch.Tensor], None] = torch.Tensor.backward) -> dict[str, float]:
    """Forward + backward of the summed entropy (minus ``diversity_weight`` x marginal entropy,
    plus ``aux_loss``); returns the values of its parts, ``entropy`` (``diversity``,
    ``aux_name``), which add up to the loss. The forwards run under ``autocast()``, the loss
    outside it, in float32; ``backward(loss)`` (a loss scaler's under fp16) runs the backward."""
    summed = {"entropy": 0.0}
    if diversity_weight > 0:
        summed["diversity"] = 0.0

    def task_loss(logits: torch.Tensor) -> torch.Tensor:
        ent = entropy(logits)
        summed["entropy"] += float(ent.detach())
        if diversity_weight <= 0:
            return ent
        diversity = -diversity_weight * marginal_entropy(logits)
        summed["diversity"] += float(diversity.detach())
        return ent + diversity

    if not joint_forward:
        if aux_loss is not None:
            summed[aux_name] = 0.0
        for t, x in batches.items():
            with autocast():
                logits = classifiers[t](x)
            loss = task_loss(logits.float())
            if aux_loss is not None:
                aux = aux_loss(t)
                loss = loss + aux
                summed[aux_name] += float(aux.detach())
            backward(loss)
        return summed
    tasks = list(batches)
    xs = [batches[t] for t in tasks]
    # One encoder pass; each task's logits then exactly as ImageClassifier computes them.
    with autocast():
        features = model(torch.cat(xs))
    feats = F.normalize(features.float(), dim=-1)
    loss = sum(task_loss(f @ heads[t].t()) for t, f in zip(tasks, feats.split([len(x) for x in xs])))
    backward(loss)
    return summed
