"""The embedded suite's models: a tiny CLIP pretrained contrastively, then one fine-tuned
image encoder per task, all cached by content.

Two stages, mirroring how the real benchmark's checkpoints come to be:

1. *Pretraining*: an open_clip CLIP (``harness-tiny-vit`` by default) trained from scratch
   with the CLIP loss on ``pretraining_pool`` image-caption pairs, so zero-shot text heads
   (:func:`harness.models.zeroshot_head`) classify the tasks as they do with real CLIP.
   The full-size model is trained once and shipped in ``tasks/embedded/assets``; it is used
   whenever its recorded identity matches the requested options.
2. *Fine-tuning*: per task, the image encoder trains against the frozen zero-shot head
   (:func:`harness.finetune.finetune_encoder`). ``preserve_weight > 0`` adds feature
   preservation, a documented deviation from the plain protocol (``preserve_weight=0``):
   without it a tiny model's task vectors do not compose (task arithmetic barely beats the
   pretrained model and its best lambda sits at the grid floor).

Every artifact is a safetensors file under ``cache_dir/embedded`` named by a hash of what
determines it (data version, options, seed and, for fine-tuned encoders, the pretrained
file's digest), written atomically, and reused when present.

Command line: ``python -m tasks.embedded.pipeline --help``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import json
import multiprocessing as mp
import shlex
import sys
import time
import warnings
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from harness.cache import (
    atomic_write_json,
    build_lock,
    check_digest,
    content_key,
    read_json,
    remove_stale_temporaries,
)
from harness.models import (
    CONFIG_DIR,
    ImageClassifier,
    build_clip,
    file_digest,
    get_tokenizer,
    load_state_dict,
    save_state_dict,
    whole_safetensors,
    zeroshot_head,
)
from harness.runtime import torch_threads

ASSETS_DIR = Path(__file__).parent / "assets"

PRETRAIN_FIELDS = (
    "arch", "size", "seed", "pretrain_pool", "pretrain_pool_seed", "pretrain_steps",
    "pretrain_batch_size", "pretrain_lr", "pretrain_weight_decay", "pretrain_warmup", "grad_clip",
)
FINETUNE_FIELDS = (
    "size", "seed", "finetune_steps", "finetune_lr", "finetune_batch_size", "finetune_weight_decay",
    "finetune_warmup", "grad_clip", "preserve_weight", "preserve_pool",
)


class SuiteOptions(BaseModel):
    """Settings of the embedded suite's models (unknown keys are an error).

    Defaults are the benchmark's regime. ``preserve_weight`` > 0 is feature preservation, a
    deviation from the task-vectors fine-tuning protocol; set it to 0 for the plain protocol.
    ``workers`` only changes how fast artifacts are made, never what they contain.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: Literal["full", "tiny"] = Field("full", description="data size of the tasks and the pool")
    arch: str = Field("harness-tiny-vit", description="open_clip architecture name")
    seed: int = Field(0, ge=0, description="seed of initialisation, data order and preservation batches")
    finetune_seed: int | None = Field(None, ge=0, description="seed of fine-tuning alone (data order, preservation "
                                      "batches): other encoders from the same pretrained model; default: seed")
    # Contrastive pretraining.
    pretrain_pool: int = Field(40000, ge=16, description="image-caption pairs in the pretraining pool")
    pretrain_pool_seed: int = Field(1, ge=0, description="seed of the generated pretraining pool")
    pretrain_steps: int = Field(500, ge=1, description="CLIP-loss optimisation steps")
    pretrain_batch_size: int = Field(256, ge=2)
    pretrain_lr: float = Field(1e-3, gt=0, le=1.0)
    pretrain_weight_decay: float = Field(0.1, ge=0)
    pretrain_warmup: int = Field(60, ge=0)
    # Fine-tuning (task-vectors protocol: AdamW, warmup + cosine, frozen zero-shot head).
    finetune_optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="adamw (the protocol) or sgd (momentum 0.9, same schedule; lr 0.01-0.03 measured)")
    finetune_steps: int = Field(600, ge=1)
    finetune_lr: float = Field(1e-4, gt=0, le=1.0)
    finetune_batch_size: int = Field(64, ge=1)
    finetune_weight_decay: float = Field(0.1, ge=0)
    finetune_warmup: int = Field(50, ge=0)
    grad_clip: float = Field(1.0, ge=0, description="gradient-norm clip of both stages (0 = off)")
    preserve_weight: float = Field(5.0, ge=0, description="feature preservation weight; 0 = plain protocol")
    preserve_pool: int = Field(2048, ge=1, description="pool images the preservation term draws from")
    workers: int = Field(2, ge=1, le=64, description="parallel fine-tuning processes (1 thread each)")

    def pretrain_identity(self, data_version: str) -> dict[str, Any]:
        """What determines the pretrained weights (also recorded next to shipped weights)."""
        return {"data_version": data_version, "arch_config": _arch_config(self.arch),
                **{k: getattr(self, k) for k in PRETRAIN_FIELDS}}

    def finetune_identity(self, data_version: str, task: str, pretrained_digest: str, source: str) -> dict[str, Any]:
        """``source`` (real data or its stand-in) keeps an encoder fine-tuned on one from being
        reused when the other is in effect."""
        identity = {"data_version": data_version, "task": task, "pretrained": pretrained_digest, "source": source,
                    **{k: getattr(self, k) for k in FINETUNE_FIELDS}}
        # Left at their defaults, the later options stay out of the identity: caches stay valid.
        if self.finetune_seed is not None:
            identity["finetune_seed"] = self.finetune_seed
        if self.finetune_optimizer != "adamw":
            identity["finetune_optimizer"] = self.finetune_optimizer
        return identity

    @property
    def effective_finetune_seed(self) -> int:
        return self.seed if self.finetune_seed is None else self.finetune_seed


@dataclass
class SuiteArtifacts:
    """Paths of a prepared suite; ``timings`` holds training seconds (0.0 = reused)."""

    arch: str
    pretrained: Path
    finetuned: dict[str, Path]
    identity: str
    timings: dict[str, float] = field(default_factory=dict)


def _arch_config(arch: str) -> Any:
    """The project's JSON config of ``arch`` (so resizing the model changes every key)."""
    path = CONFIG_DIR / f"{arch}.json"
    return json.loads(path.read_text()) if path.is_file() else arch


def _data():
    import tasks.embedded as data

    return data


# ---------------------------------------------------------------------------------------
# Contrastive pretraining.


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, caption_ids: torch.Tensor,
              logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss where identical captions in a batch are one text.

    ``text_features[j]`` encodes the j-th distinct caption of the batch and
    ``caption_ids[i]`` says which one image i carries. Image->text is plain cross-entropy;
    text->image spreads the target evenly over the images that share the caption, so a
    generated pool with repeated captions has no false negatives.
    """
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    logits = logit_scale * img @ txt.t()  # [images, texts]
    loss_i = F.cross_entropy(logits, caption_ids)
    positives = F.one_hot(caption_ids, num_classes=txt.shape[0]).float().t()  # [texts, images]
    targets = positives / positives.sum(1, keepdim=True)
    loss_t = -(targets * F.log_softmax(logits.t(), dim=-1)).sum(1).mean()
    return 0.5 * (loss_i + loss_t)


def _on_one_thread(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn`` on one torch thread, the caller's count restored after: reductions split over
    threads round differently, so trained weights would otherwise depend on the machine's cores,
    which no cache key names (the shipped weights were trained on one thread)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch_threads(1):
            return fn(*args, **kwargs)

    return wrapper


@_on_one_thread
def pretrain_clip(
    arch: str,
    images: torch.Tensor,
    captions: list[str],
    *,
    steps: int,
    batch_size: int = 256,
    lr: float = 1e-3,
    weight_decay: float = 0.1,
    warmup: int = 60,
    grad_clip: float = 1.0,
    seed: int = 0,
    progress: Callable[[int, int, dict[str, float]], None] | None = None,
) -> nn.Module:
    """A CLIP of architecture ``arch`` trained from scratch on uint8 ``images`` [N,H,W,3].

    AdamW with warmup + cosine; no weight decay on gains, biases, embeddings' scale or the
    logit scale (the open_clip training recipe), logit scale clamped at 100. One thread, so the
    weights are the same on any machine.
    """
    from harness.finetune import warmup_cosine
    from tasks.base import normalize_uint8

    if len(images) != len(captions):
        raise ValueError("one caption per image is required")
    torch.manual_seed(seed)
    model = build_clip(arch).float()
    tokenizer = get_tokenizer(arch)
    distinct = sorted(set(captions))
    index = {c: i for i, c in enumerate(distinct)}
    tokens = torch.cat([tokenizer(distinct[i : i + 1024]) for i in range(0, len(distinct), 1024)])
    ids = torch.tensor([index[c] for c in captions])

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "logit_scale" in name or "positional_embedding" in name
         or "class_embedding" in name else decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, warmup))
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(images))
    perm, pos = torch.randperm(len(images), generator=generator), 0
    model.train()
    for step in range(steps):
        if pos + batch_size > len(perm):
            perm, pos = torch.randperm(len(images), generator=generator), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        batch_ids = ids[idx]
        uniq, caption_ids = torch.unique(batch_ids, return_inverse=True)
        img_f = model.encode_image(normalize_uint8(images[idx]))
        txt_f = model.encode_text(tokens[uniq])
        loss = clip_loss(img_f, txt_f, caption_ids, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        if progress is not None:
            progress(step + 1, steps, {"loss": loss.item(), "scale": model.logit_scale.exp().item()})
    return model.eval()


# ---------------------------------------------------------------------------------------
# The suite: cached artifacts.


def shipped_pretrained(arch: str) -> tuple[Path, dict[str, Any] | None]:
    """The shipped weights of ``arch`` and their metadata (None when absent)."""
    path = ASSETS_DIR / f"{arch}-pretrained.safetensors"
    meta = read_json(path.with_suffix(".json")) if path.is_file() else None
    return path, meta


def _progress_bars(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from harness.progress import progress_bars

    return progress_bars(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                         TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                         enabled=enabled)


def _bar_callback(bars, bar_id, every: int = 10):
    def update(step: int, total: int, metrics: dict[str, float]) -> None:
        if step % every == 0 or step == total:
            info = " ".join(f"{k} {v:.3g}" for k, v in metrics.items())
            bars.update(bar_id, completed=step, info=info)

    return update


def cached_pool(n: int, seed: int, size: str, cache_dir: Path) -> tuple[torch.Tensor, list[str]]:
    """``pretraining_pool(n, seed, size)``, generated once and kept in ``cache_dir`` (minutes
    of rendering for tens of thousands of images, milliseconds to read back). The pool trains
    whatever model is (re)built from it, so its images and captions are checked against the
    digests recorded when they were written (:func:`harness.cache.check_digest`): one edited in
    place is generated again, with a warning, not trained on."""
    data = _data()
    key = content_key({"data_version": data.DATA_VERSION, "n": n, "seed": seed, "size": size})
    path = cache_dir / "pool" / f"pool-{key}.safetensors"
    captions_path = path.with_suffix(".json")
    if path.is_file() and captions_path.is_file():
        try:
            return _read_pool(path, captions_path, n)
        except ValueError as exc:
            warnings.warn(f"{exc}; generating it again", stacklevel=2)
        except Exception:  # an unreadable file is regenerated
            pass
    images, captions = data.pretraining_pool(n, seed=seed, size=size)
    atomic_write_json(captions_path, {"captions": list(captions)}, digest=True)
    save_state_dict({"images": images}, path, digest=True)
    return images, list(captions)


def _read_pool(path: Path, captions_path: Path, n: int) -> tuple[torch.Tensor, list[str]]:
    """A cached pool's images and captions, their digests checked; ValueError when one differs,
    KeyError or OSError when unreadable or of another size."""
    check_digest(captions_path)
    meta = read_json(captions_path)
    if meta is None or len(meta.get("captions", [])) != n:
        raise KeyError(f"{captions_path}: not the captions of {n} images")
    check_digest(path)
    return load_state_dict(path)["images"], list(meta["captions"])


def _pretrained_path(opts: SuiteOptions, cache_dir: Path, data_version: str, from_scratch: bool) -> Path:
    """Where the suite's pretrained CLIP is (the shipped weights when they match), built or not."""
    identity = opts.pretrain_identity(data_version)
    shipped, meta = shipped_pretrained(opts.arch)
    if not from_scratch and meta is not None and meta.get("identity") == identity:
        return shipped
    return cache_dir / "pretrained" / f"{opts.arch}-{content_key(identity)}.safetensors"


def _ensure_pretrained(opts: SuiteOptions, cache_dir: Path, data_version: str, bars, from_scratch: bool,
                       locked: bool = False) -> tuple[Path, float]:
    identity = opts.pretrain_identity(data_version)
    path = _pretrained_path(opts, cache_dir, data_version, from_scratch)
    if (path.is_file() and path.parent == ASSETS_DIR) or _reusable(path):  # the shipped file is the checkout's
        return path, 0.0
    if locked:  # a killed run's (the prepare lock is held: nobody else writes it)
        remove_stale_temporaries(path)
    images, captions = cached_pool(opts.pretrain_pool, opts.pretrain_pool_seed, opts.size, cache_dir)
    bar = bars.add_task(f"pretrain {opts.arch}", total=opts.pretrain_steps, info="")
    start = time.perf_counter()
    model = pretrain_clip(opts.arch, images, captions, steps=opts.pretrain_steps,
                          batch_size=opts.pretrain_batch_size, lr=opts.pretrain_lr,
                          weight_decay=opts.pretrain_weight_decay, warmup=opts.pretrain_warmup,
                          grad_clip=opts.grad_clip, seed=opts.seed, progress=_bar_callback(bars, bar))
    seconds = time.perf_counter() - start
    save_state_dict(model.state_dict(), path, metadata={"identity": json.dumps(identity, sort_keys=True)},
                    digest=True)
    atomic_write_json(path.with_suffix(".json"), {"identity": identity, "train_seconds": round(seconds, 1)})
    return path, seconds


def _reusable(path: Path) -> bool:
    """Whether the cached model file ``path`` is whole and has the content recorded when it was
    written (:func:`harness.cache.check_digest`): one truncated, or edited in place under a valid
    header (a flipped bit changes every merge made from it), is built again, with a warning."""
    if not whole_safetensors(path):
        return False
    try:
        check_digest(path)
    except ValueError as exc:
        warnings.warn(f"{exc}; building it again", stacklevel=2)
        return False
    return True


def _finetune_job(task: str, opts_json: str, pretrained: str, out: str, preserve: torch.Tensor | None,
                  data_root: str, queue=None) -> tuple[str, float]:
    """Fine-tune one task's encoder and save it (runs in the parent or a worker process); the
    task's images come from ``data_root``, the cache the sweep names, as everywhere else."""
    torch.set_num_threads(1)
    from harness.finetune import finetune_encoder
    from tasks.base import normalize_uint8

    opts = SuiteOptions.model_validate_json(opts_json)
    clip = build_clip(opts.arch, pretrained=pretrained)
    data = _data().load_task(task, size=opts.size, cache_dir=data_root)
    head = zeroshot_head(clip, get_tokenizer(opts.arch), data.prompts())

    def progress(step: int, total: int, metrics: dict[str, float]) -> None:
        if queue is not None and (step % 10 == 0 or step == total):
            queue.put((task, step, metrics))

    start = time.perf_counter()
    encoder = finetune_encoder(
        clip.visual, head, data.dataset("train"), steps=opts.finetune_steps, lr=opts.finetune_lr,
        weight_decay=opts.finetune_weight_decay, batch_size=opts.finetune_batch_size,
        warmup=opts.finetune_warmup, grad_clip=opts.grad_clip, seed=opts.effective_finetune_seed,
        preserve_weight=opts.preserve_weight, optimizer=opts.finetune_optimizer,
        preserve_images=normalize_uint8(preserve) if preserve is not None else None,
        progress=progress)
    seconds = time.perf_counter() - start
    save_state_dict(encoder.state_dict(), out, metadata={"task": task}, digest=True)
    return task, seconds


def _build_lock(cache_dir: Path, progress: bool) -> AbstractContextManager[bool]:
    """One process at a time prepares models in a cache folder: two sweeps (or SLURM jobs)
    sharing it would otherwise train the same models at once."""
    return build_lock(cache_dir / ".prepare.lock", f"waiting for another process that is preparing models in "
                      f"{cache_dir}" if progress else None)


def prepare_suite(task_names: list[str], cache_dir: Path, options: dict | None = None, progress: bool = True,
                  from_scratch: bool = False, train: bool = True) -> SuiteArtifacts:
    """Pretrained CLIP + one fine-tuned image encoder per task, trained only where missing.

    ``train=False`` only looks them up (no lock, nothing written) and raises
    :class:`harness.errors.NotBuilt` when one is missing.

    ``from_scratch`` ignores the shipped pretrained weights (artifacts already trained into
    ``cache_dir`` are still reused). ``pretrained`` loads with
    ``build_clip(arch, pretrained=str(path))``; ``finetuned[task]`` is a ``clip.visual``
    state dict.
    """
    opts = SuiteOptions.model_validate(options or {})
    data = _data()
    unknown = [t for t in task_names if t not in data.EMBEDDED_TASKS]
    if unknown:
        raise KeyError(f"unknown embedded tasks {unknown}; available: {list(data.EMBEDDED_TASKS)}")
    data_root = str(cache_dir)
    cache_dir = Path(cache_dir) / "embedded"
    timings: dict[str, float] = {}
    total_start = time.perf_counter()
    if not train:
        return _built_suite(opts, task_names, cache_dir, data, from_scratch)
    with _build_lock(cache_dir, progress) as locked, _progress_bars(progress) as bars:
        pretrained, timings["pretrain"] = _ensure_pretrained(opts, cache_dir, data.DATA_VERSION, bars, from_scratch,
                                                             locked)
        digest = file_digest(pretrained)
        finetuned: dict[str, Path] = {}
        todo: list[str] = []
        for task in task_names:
            finetuned[task] = _finetuned_path(opts, cache_dir, data, task, digest)
            timings[f"finetune:{task}"] = 0.0
            if not _reusable(finetuned[task]):
                todo.append(task)
                if locked:  # a killed run's, under the prepare lock (unlocked, another's may be live)
                    remove_stale_temporaries(finetuned[task])
        if todo:
            preserve = None
            if opts.preserve_weight > 0:
                preserve, _ = cached_pool(opts.preserve_pool, opts.pretrain_pool_seed + 1000, opts.size, cache_dir)
            bar_ids = {t: bars.add_task(f"finetune {t}", total=opts.finetune_steps, info="") for t in todo}
            jobs = [(t, opts.model_dump_json(), str(pretrained), str(finetuned[t]), preserve, data_root) for t in todo]
            timings.update(_run_jobs(jobs, min(opts.workers, len(todo)), bars, bar_ids, opts.finetune_steps))
    timings["total"] = time.perf_counter() - total_start
    return SuiteArtifacts(opts.arch, pretrained, finetuned, _suite_identity(digest, finetuned), timings)


def _finetuned_path(opts: SuiteOptions, cache_dir: Path, data: Any, task: str, digest: str) -> Path:
    """Where ``task``'s fine-tuned encoder is, built or not (keyed by what trains it)."""
    key = content_key(opts.finetune_identity(data.DATA_VERSION, task, digest, data.source_variant(task)))
    return cache_dir / "finetuned" / f"{task}-{key}.safetensors"


def _suite_identity(digest: str, finetuned: dict[str, Path]) -> str:
    return content_key({"pretrained": digest, "finetuned": {t: p.name for t, p in sorted(finetuned.items())}})


def _built_suite(opts: SuiteOptions, task_names: list[str], cache_dir: Path, data: Any,
                 from_scratch: bool) -> SuiteArtifacts:
    """The suite's artifacts as :func:`prepare_suite` returns them, when all are built already."""
    from harness.errors import NotBuilt

    pretrained = _pretrained_path(opts, cache_dir, data.DATA_VERSION, from_scratch)
    if not pretrained.is_file():
        raise NotBuilt(f"the embedded suite's pretrained model is not built yet ({pretrained})")
    if pretrained.parent != ASSETS_DIR:  # the shipped file is the checkout's
        _check_built(pretrained)
    digest = file_digest(pretrained)
    finetuned = {t: _finetuned_path(opts, cache_dir, data, t, digest) for t in task_names}
    missing = [t for t, p in finetuned.items() if not p.is_file()]
    if missing:
        raise NotBuilt(f"the embedded suite's fine-tuned models of {', '.join(missing)} are not built yet")
    for path in finetuned.values():
        _check_built(path)
    return SuiteArtifacts(opts.arch, pretrained, finetuned, _suite_identity(digest, finetuned), {})


def _check_built(path: Path) -> None:
    """NotBuilt naming ``path`` when it differs from the digest recorded when it was written
    (a lookup records none: it writes nothing)."""
    from harness.errors import NotBuilt

    try:
        check_digest(path, record=False)
    except ValueError as exc:
        raise NotBuilt(f"{exc}: a run builds it again") from None


class _DirectQueue:
    """The ``put`` of a queue, delivering progress straight to the bars (no worker)."""

    def __init__(self, deliver: Callable[..., None]):
        self.deliver = deliver

    def put(self, item: tuple) -> None:
        self.deliver(*item)


def _run_jobs(jobs: list[tuple], workers: int, bars, bar_ids: dict[str, Any], total_steps: int) -> dict[str, float]:
    """Run fine-tuning jobs, in this process or in ``workers`` spawned ones, with progress."""
    timings: dict[str, float] = {}

    def show(task: str, step: int, metrics: dict[str, float]) -> None:
        bars.update(bar_ids[task], completed=step, info=" ".join(f"{k} {v:.3g}" for k, v in metrics.items()))

    if workers <= 1:
        for job in jobs:
            _, timings[f"finetune:{job[0]}"] = _finetune_job(*job, queue=_DirectQueue(show))
        return timings
    from harness.executors.local import terminate_workers

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager, cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        queue = manager.Queue()
        futures = [pool.submit(_finetune_job, *job, queue=queue) for job in jobs]
        pending = set(futures)
        try:
            while pending:
                done, pending = cf.wait(pending, timeout=0.5)
                while not queue.empty():
                    show(*queue.get())
                for fut in done:
                    task, seconds = fut.result()
                    timings[f"finetune:{task}"] = seconds
                    show(task, total_steps, {"done": 1.0})
        except BaseException:  # Ctrl-C or a failed task: stop the others now (finished ones are cached)
            terminate_workers(pool)
            raise
    return timings


# ---------------------------------------------------------------------------------------
# Quality report: the numbers the suite must show before it is a useful benchmark.


def _is_mlp(key: str) -> bool:
    return ".mlp." in key


@torch.no_grad()
def quality_report(artifacts: SuiteArtifacts, size: str = "full",
                   lambdas: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0),
                   routing_lambda: float = 0.3) -> dict[str, Any]:
    """Test accuracy of pretrained, individual, weight averaging, task arithmetic (lambda
    chosen on val) and the WeMoE perfect-routing bound (each task's own fine-tuned MLPs,
    everything else merged by task arithmetic at ``routing_lambda``), per task and averaged.
    Also the relative norm ||tau_t|| / ||theta_0|| of each task vector.
    """
    from harness.evaluation import accuracy

    data = _data()
    tasks_ = list(artifacts.finetuned)
    clip = build_clip(artifacts.arch, pretrained=str(artifacts.pretrained))
    tokenizer = get_tokenizer(artifacts.arch)
    loaded = {t: data.load_task(t, size=size) for t in tasks_}
    heads = {t: zeroshot_head(clip, tokenizer, loaded[t].prompts()) for t in tasks_}
    splits = {(t, s): loaded[t].dataset(s) for t in tasks_ for s in ("val", "test")}
    encoder = clip.visual
    base = {k: v.clone() for k, v in encoder.state_dict().items()}
    fts = {t: load_state_dict(artifacts.finetuned[t]) for t in tasks_}
    taus = {t: {k: fts[t][k] - base[k] for k in base if base[k].is_floating_point()} for t in tasks_}

    def evaluate(state: dict[str, torch.Tensor], split: str, only: list[str] | None = None) -> dict[str, float]:
        encoder.load_state_dict(state)
        return {t: accuracy(ImageClassifier(encoder, heads[t]), splits[(t, split)]) for t in (only or tasks_)}

    def ta(lam: float) -> dict[str, torch.Tensor]:
        return {k: (v + lam * sum(taus[t][k] for t in tasks_)) if k in taus[tasks_[0]] else v for k, v in base.items()}

    def avg(d: dict[str, float]) -> float:
        return sum(d.values()) / len(d)

    report: dict[str, Any] = {"tasks": tasks_}
    report["pretrained"] = evaluate(base, "test")
    report["individual"] = {t: evaluate(fts[t], "test", [t])[t] for t in tasks_}
    wa = {k: (sum(fts[t][k] for t in tasks_) / len(tasks_)) if k in taus[tasks_[0]] else v for k, v in base.items()}
    report["weight_averaging"] = evaluate(wa, "test")
    grid_val = {lam: avg(evaluate(ta(lam), "val")) for lam in lambdas}
    best = max(grid_val, key=grid_val.get)
    report["ta_grid_val"] = grid_val
    report["ta_best_lambda"] = best
    report["task_arithmetic"] = evaluate(ta(best), "test")
    merged = ta(routing_lambda)
    routed = {}
    for t in tasks_:
        state = {k: (fts[t][k] if _is_mlp(k) else v) for k, v in merged.items()}
        routed[t] = evaluate(state, "test", [t])[t]
    report["perfect_routing"] = routed
    norm0 = torch.sqrt(sum(v.float().pow(2).sum() for k, v in base.items() if k in taus[tasks_[0]]))
    report["tau_relative_norm"] = {t: (torch.sqrt(sum(v.pow(2).sum() for v in taus[t].values())) / norm0).item()
                                   for t in tasks_}
    report["averages"] = {k: avg(report[k]) for k in
                          ("pretrained", "individual", "weight_averaging", "task_arithmetic", "perfect_routing")}
    a = report["averages"]
    report["bars"] = {
        "individual >= pretrained + 10": a["individual"] >= a["pretrained"] + 10,
        "TA >= pretrained + 5": a["task_arithmetic"] >= a["pretrained"] + 5,
        "TA best lambda strictly inside grid": min(lambdas) < best < max(lambdas),
        "TA > WA": a["task_arithmetic"] > a["weight_averaging"],
        "individual >= TA + 5": a["individual"] >= a["task_arithmetic"] + 5,
        "perfect routing >= TA + 3": a["perfect_routing"] >= a["task_arithmetic"] + 3,
    }
    return report


def format_report(report: dict[str, Any]) -> str:
    rows = ["pretrained", "individual", "weight_averaging", "task_arithmetic", "perfect_routing"]
    tasks_ = report["tasks"]
    lines = ["method".ljust(18) + "".join(t[:9].rjust(10) for t in tasks_) + "avg".rjust(8)]
    for r in rows:
        lines.append(r.ljust(18) + "".join(f"{report[r][t]:10.1f}" for t in tasks_) + f"{report['averages'][r]:8.1f}")
    lines.append("tau rel. norm".ljust(18) + "".join(f"{report['tau_relative_norm'][t]:10.3f}" for t in tasks_))
    lines.append("TA val grid: " + ", ".join(f"{k}: {v:.1f}" for k, v in report["ta_grid_val"].items())
                 + f"  (best {report['ta_best_lambda']})")
    lines += [f"[{'x' if ok else ' '}] {name}" for name, ok in report["bars"].items()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Command line.


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def ship_pretrained(options: dict | None, cache_dir: Path, command: str) -> Path:
    """Train the full-size pretrained model from scratch and copy it into the assets."""
    opts = SuiteOptions.model_validate(options or {})
    if opts.size != "full":
        raise ValueError("only the full-size pretrained model is shipped")
    data = _data()
    with _progress_bars(True) as bars:
        path, seconds = _ensure_pretrained(opts, Path(cache_dir) / "embedded", data.DATA_VERSION, bars, True)
    target, _ = shipped_pretrained(opts.arch)
    save_state_dict(load_state_dict(path), target)
    recorded = read_json(path.with_suffix(".json")) or {}
    atomic_write_json(target.with_suffix(".json"), {
        "identity": opts.pretrain_identity(data.DATA_VERSION),
        "train_seconds": recorded.get("train_seconds", round(seconds, 1)),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "command": command,
    })
    return target


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m tasks.embedded.pipeline``; its cache folder is the one a
    sweep without ``cache_dir`` uses, so the suite it builds is the one sweeps read."""
    from tasks.embedded.data import default_cache_dir

    cli = argparse.ArgumentParser(allow_abbrev=False, prog="python -m tasks.embedded.pipeline",
                                  description=__doc__.split("\n")[0])
    cli.add_argument("--tasks", nargs="*", default=None, help="task names (default: all embedded tasks)")
    cli.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                     help="default: $HARNESS_CACHE, else ~/.cache/harness, where sweeps look")
    cli.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                     help="a SuiteOptions field (repeatable)")
    cli.add_argument("--from-scratch", action="store_true", help="ignore the shipped pretrained weights")
    cli.add_argument("--ship", action="store_true", help="train and ship the full-size pretrained model")
    cli.add_argument("--report", action="store_true", help="print the quality report")
    cli.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    return cli


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    torch.set_num_threads(1)
    options = _parse_sets(args.sets)
    command = "python -m tasks.embedded.pipeline " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    if args.ship:
        print(f"shipped {ship_pretrained(options, args.cache_dir, command)}")
        return 0
    names = args.tasks or list(_data().EMBEDDED_TASKS)
    artifacts = prepare_suite(names, args.cache_dir, options, progress=True, from_scratch=args.from_scratch)
    print(json.dumps({k: round(v, 1) for k, v in artifacts.timings.items()}))
    if args.report:
        report = quality_report(artifacts, size=SuiteOptions.model_validate(options).size)
        print(format_report(report))
        if args.json:
            atomic_write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
