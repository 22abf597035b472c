"""Bring existing checkpoints into the harness's layout: detect, convert, cache.

Three layouts arrive: Hugging Face ``transformers`` CLIP folders (converted by
:mod:`harness.hf_convert`, no trust needed), task_vectors pickles (converted by
:mod:`harness.convert`, only with ``trust_pickle``), and plain state dicts (safetensors or
tensor-only ``.pt``). :func:`resolve_checkpoint` lets a sweep name any of them directly: the
conversion is written once into the cache, under a key made of the source's sha256 (and what
else shapes the output), and reused on the next call, in any process.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from harness.cache import build_lock, remove_stale_temporaries
from harness.convert import FORMAT, convert_pickled_checkpoint, refuse_file_output
from harness.errors import HarnessError, NotBuilt
from harness.hf_convert import (
    Kind,
    combined_digest,
    convert_hf_checkpoint,
    ensure_arch,
    has_projection,
    hf_folder_of,
    projection_digest,
    read_hf_config,
    refuse_hf_output,
    source_digests,
)
from harness.models import (
    available_models,
    file_digest,
    is_safetensors,
    json_file,
    load_state_dict,
    resolve_arch,
    tensor_shapes,
    torch_load_tensors,
    unreadable_reason,
    whole_safetensors,
)

Layout = Literal["huggingface", "file", "tree"]
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
_ENCODER_KEYS = ("conv1.weight", "class_embedding", "proj")
_CLIP_KEYS = ("visual.conv1.weight", "visual.proj", "token_embedding.weight", "text_projection")
_SCALARS = ("logit_scale", "logit_bias")  # a whole CLIP's, outside both towers
NOT_WHOLE_CLIP = (f"not a whole CLIP state dict (needs {', '.join(_CLIP_KEYS)}): the pretrained model's text "
                  "tower builds the zero-shot heads; give a Hugging Face CLIPModel folder, an open_clip CLIP "
                  "state dict, or an open_clip pretrained tag")


def whole_clip_problem(path: str | os.PathLike) -> str | None:
    """Why ``path``, a weights file named as the pretrained model, is refused by
    :func:`resolve_checkpoint` and :func:`harness.models.build_clip` (None when it is not): read
    from a safetensors header or a ``.pt``'s mapped tensors, nothing unpickled, no model built.
    Safetensors load as they are when they hold a ``visual.`` tower; other files are converted,
    which needs the keys of an open_clip CLIP."""
    p = Path(path)
    if hf_folder_of(p) is not None or p.is_dir():
        return None  # the Hugging Face converter reads folders
    keys = tensor_shapes(p)
    if is_safetensors(p):
        # an image tower and a text tower (open_clip's CLIP keys, or a CustomTextCLIP's ``text.``):
        # a ``visual.``-prefixed encoder alone would otherwise fail the architecture check instead
        has_text = any(not k.startswith("visual.") and k not in _SCALARS for k in keys)
        return None if has_text and any(k.startswith("visual.") for k in keys) else NOT_WHOLE_CLIP
    return None if all(k in keys for k in _CLIP_KEYS) else NOT_WHOLE_CLIP


def detect_layout(path: str | os.PathLike) -> Layout:
    """``huggingface`` (a transformers CLIP folder or its weights file), ``file``, or ``tree`` (a folder of checkpoints)."""
    p = Path(path)
    if hf_folder_of(p) is not None:
        return "huggingface"
    if p.is_file():
        return "file"
    if p.is_dir():
        if (p / "config.json").is_file():
            return "huggingface"  # a broken or non-CLIP folder: the HF reader names what is wrong
        return "tree"
    raise HarnessError(f"{p}: no such file or folder")


def import_checkpoints(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    trust_pickle: bool = False,
    arch: str | None = None,
    projection: str | os.PathLike | None = None,
    full: bool = False,
    verify: bool = False,
    overwrite: bool = False,
    kept: Callable[[Path], None] | None = None,
    done: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Convert ``src`` (HF folder, checkpoint file, or a folder of them) under ``dst``; return the output files.

    A tree keeps its relative layout: ``src/SUN397/finetuned.pt`` -> ``dst/SUN397/finetuned.safetensors``,
    ``src/clip-vit-base-patch32_sun397/`` -> ``dst/clip-vit-base-patch32_sun397.safetensors``.
    ``full`` keeps the text tower of ``CLIPModel`` folders (the pretrained model: zero-shot
    heads need it); vision-only folders stay image encoders. An output that exists already is kept
    as :func:`harness.convert.write_checkpoint` says (``overwrite``, ``kept``): the same import
    run again writes nothing. A tree's outputs are all checked before any is converted
    (:func:`_refuse_outputs`), so one refused there stops the import with nothing written.
    ``done`` is called with each output once it is written or kept, so the outputs made before
    an error that stops a tree's import while converting can be told.
    """
    src, given, dst = Path(src), dst, Path(dst)
    layout = detect_layout(src)
    if layout in ("huggingface", "file"):
        out = (_import_hf(src, given, arch, projection, full, verify, overwrite, kept) if layout == "huggingface"
               else convert_pickled_checkpoint(src, given, trust_pickle=trust_pickle, arch=arch, overwrite=overwrite,
                                               kept=kept))
        if done is not None:
            done(out)
        return [out]
    if dst.is_file():
        raise HarnessError(f"{dst}: is a file; a folder of checkpoints converts into a folder")
    items = _tree_items(src, skip=dst)
    if not items:
        raise HarnessError(f"{src}: no Hugging Face CLIP folders or checkpoint files ({', '.join(CHECKPOINT_SUFFIXES)}) inside")
    outputs = _tree_outputs(src, dst, items)
    _refuse_outputs(outputs, overwrite)
    if projection is None:
        _refuse_missing_projections([item for item in outputs if item.is_dir()])
    _refuse_unloadable_files([item for item in outputs if item.is_file()], trust_pickle)
    written = []
    for item, out in outputs.items():  # each output's folder made as it is written
        if item.is_dir():
            written.append(_import_hf(item, out, arch, projection, full, verify, overwrite, kept))
        else:
            written.append(convert_pickled_checkpoint(item, out, trust_pickle=trust_pickle, arch=arch,
                                                      overwrite=overwrite, kept=kept))
        if done is not None:
            done(written[-1])
    return written


def _refuse_missing_projections(folders: list[Path]) -> None:
    """Refuse a tree's import before any output is written when a vision-only folder in it lacks
    the visual projection and none is given: its conversion would stop the import midway, the
    outputs before it written. Read from the folders' headers, no tensor; every such folder named
    (one whose weights cannot be read is left to its conversion, which names the damage)."""
    lacking = []
    for folder in folders:
        try:
            if not has_projection(folder):
                lacking.append(folder)
        except HarnessError:
            continue
    if lacking:
        raise HarnessError(f"{', '.join(map(str, lacking))}: a CLIPVisionModel has no visual_projection; give the "
                           "projection of the model they were fine-tuned from (--projection <pretrained CLIPModel "
                           "folder>); nothing was written")


def _refuse_unloadable_files(files: list[Path], trust_pickle: bool) -> None:
    """Refuse a tree's import before any output is written when a file in it cannot be converted:
    damaged (empty, truncated, not a checkpoint) or, without ``trust_pickle``, pickled Python
    objects (task_vectors' layout). Its conversion would stop the import midway, the outputs
    before it written; every such file is named. Read from safetensors headers and mapped tensors,
    nothing unpickled."""
    damaged, pickled = [], []
    for f in files:
        if is_safetensors(f):
            try:
                tensor_shapes(f)
            except HarnessError as exc:
                damaged.append(str(exc))
            continue
        try:
            torch_load_tensors(f, mmap=True)
        except Exception as exc:  # noqa: BLE001  (torch's errors for damaged files vary)
            damage = unreadable_reason(f, exc)
            if damage is not None:
                damaged.append(f"{f}: not a readable checkpoint: {damage}")
            elif not trust_pickle:
                pickled.append(str(f))
    if pickled:
        damaged.append(f"{', '.join(pickled)}: pickled Python objects (task_vectors checkpoints are whole "
                       "pickled modules), not loaded: unpickling runs any code a file contains; if you trust "
                       "where they come from, import with `harness import SRC DST --trust-pickle`")
    if damaged:
        raise HarnessError("; ".join(damaged) + "; nothing was written")


def _tree_outputs(src: Path, dst: Path, items: list[Path]) -> dict[Path, Path]:
    """Each item's output file under ``dst``, keeping its relative layout; two sources that would
    write one file (``finetuned.pt`` beside ``finetuned.safetensors``) are refused before any
    conversion, or the second would silently replace the first."""
    outputs: dict[Path, Path] = {}
    claimed: dict[Path, Path] = {}
    for item in items:
        rel = item.relative_to(src)
        out = (dst / rel).with_suffix(".safetensors") if item.is_file() else dst / rel.parent / f"{rel.name}.safetensors"
        if out in claimed:
            raise HarnessError(f"{claimed[out]} and {item} would both be converted into {out}: move or rename one "
                               "of them, or import each on its own with `harness import SRC DST`")
        claimed[out], outputs[item] = item, out
    return outputs


def _refuse_outputs(outputs: dict[Path, Path], overwrite: bool) -> None:
    """Refuse a tree's import before any output is written when one is refused by what its
    conversion would refuse before reading its source (:func:`harness.convert.refuse_file_output`,
    :func:`harness.hf_convert.refuse_hf_output`, which each conversion calls again): a folder at
    the output, an output inside its own Hugging Face folder, and without ``overwrite`` a file that
    is no conversion of that source. Every one refused is named, not the first only: each is its
    own fix, and one rerun per output would hash every source again. Whether an existing
    conversion of the same source holds the same tensors is told only once converted."""
    refused = []
    for item, out in outputs.items():
        try:
            if item.is_dir():
                refuse_hf_output(item, out, overwrite)
            else:
                refuse_file_output(item, out, overwrite)
        except HarnessError as exc:
            refused.append(str(exc))
    if len(refused) == 1:
        raise HarnessError(refused[0])
    if refused:
        raise HarnessError(f"{len(refused)} of the {len(outputs)} outputs refused, nothing written: "
                           + " ".join(f"({i}) {why}" for i, why in enumerate(refused, 1)))


def _import_hf(folder: Path, dst: str | os.PathLike, arch: str | None, projection, full: bool, verify: bool,
               overwrite: bool, kept: Callable[[Path], None] | None) -> Path:
    kind: Kind = "clip" if full and _has_text_tower(folder) else "image_encoder"
    return convert_hf_checkpoint(folder, dst, kind=kind, arch=arch, projection=projection, verify=verify,
                                 overwrite=overwrite, kept=kept)


def _has_text_tower(folder: Path) -> bool:
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == "clip"
    except (OSError, ValueError, AttributeError):
        return False  # the converter reports what is wrong with the file


#: A partial file a killed copy or download left (``b.tmp5678.safetensors``): a ``.tmp`` part of its
#: name, digits after it at most. A checkpoint merely named with ``.tmp`` in a word (``vit.tmpl.pt``)
#: is one.
_PARTIAL = re.compile(r"\.tmp\d*\.")


def _tree_items(root: Path, skip: Path | None = None) -> list[Path]:
    """HF folders and checkpoint files below ``root`` (not the files inside an HF folder), but not
    those in the folder ``skip`` (the import's output folder inside its source: a rerun would
    convert its own outputs again, into ``skip/skip/``)."""
    found: list[Path] = []
    skipped = skip.resolve() if skip is not None else None
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if (here / d).resolve() != skipped)
        if here != root and hf_folder_of(here) is not None:
            found.append(here)
            dirnames.clear()
            continue
        found.extend(here / f for f in sorted(filenames) if f.endswith(CHECKPOINT_SUFFIXES) and not _PARTIAL.search(f))
    return found


# ---------------------------------------------------------------------------------------------
# Resolving a sweep's checkpoint
# ---------------------------------------------------------------------------------------------


def resolve_checkpoint(
    path: str | os.PathLike,
    cache_dir: str | os.PathLike,
    kind: Kind = "image_encoder",
    arch: str | None = None,
    projection: str | os.PathLike | None = None,
    trust_pickle: bool = False,
    convert: bool = True,
) -> Path:
    """A safetensors file in the harness's layout for ``path``, converting into the cache once
    (``convert=False``: only looking the conversion up, :class:`harness.errors.NotBuilt` if absent).

    ``path`` may be an HF CLIP folder (or its weights file), a task_vectors pickle (with
    ``trust_pickle``), a prefixed or ``.pt`` state dict, or a file already in the layout, which
    is returned unchanged. Conversions go to ``<cache_dir>/checkpoints/<key>.safetensors``,
    ``key`` hashing the sources' sha256, ``kind``, ``arch`` and (for a ``CLIPVisionModel``) the
    projection source's sha256; a present result is reused. ``kind="clip"`` asks for a whole
    CLIP (the pretrained model), ``"image_encoder"`` for ``clip.visual`` (fine-tuned models).
    A generated architecture is registered with open_clip before returning, so
    ``build_clip(checkpoint_arch(result))`` works in this process. For a state dict, a generated
    ``arch`` is looked up beside it and beside ``projection`` when that is a file (the pretrained
    one, whose sidecar records it).
    """
    p = Path(path)
    store = Path(cache_dir) / "checkpoints"
    layout = detect_layout(p)
    if layout == "tree":
        raise HarnessError(f"{p}: a folder that is not a Hugging Face CLIP folder (no config.json); name a checkpoint")
    if layout == "huggingface":
        folder = hf_folder_of(p)
        if folder is None:
            read_hf_config(p)
            raise HarnessError(f"{p}: not a Hugging Face CLIP folder")
        parts = source_digests(folder)
        proj_digest = None  # a projection the folder has no use for (it holds its own) keys nothing
        if projection is not None and kind == "image_encoder" and not has_projection(folder):
            proj_digest = projection_digest(projection)  # its bytes: a cached conversion reads no tensor
        key = _key({"format": FORMAT, "kind": kind, "arch": arch, "sources": combined_digest(parts),
                    "projection": proj_digest})
        out = store / f"{key}.safetensors"
        if not _complete(out):
            _must_convert(p, convert)
            with _converting(out) as todo:
                if todo:
                    convert_hf_checkpoint(folder, out, kind=kind, arch=arch,  # an unfinished one's file replaced
                                          projection=projection if proj_digest else None, overwrite=True)
        checkpoint_arch(out)
        return out
    if _in_layout(p, kind):
        checkpoint_arch(p)
        return p
    if kind == "clip":
        raise HarnessError(f"{p}: {NOT_WHOLE_CLIP}")
    key = _key({"format": FORMAT, "kind": kind, "arch": arch, "sources": file_digest(p)})
    out = store / f"{key}.safetensors"
    if not _complete(out):
        _must_convert(p, convert)
        if arch is not None and projection is not None and Path(projection).is_file():
            resolve_arch(arch, [p, projection])  # a generated name the state dict does not record
        with _converting(out) as todo:
            if todo:
                convert_pickled_checkpoint(p, out, trust_pickle=trust_pickle, arch=arch, overwrite=True)
    return out


def _must_convert(path: Path, convert: bool) -> None:
    if not convert:
        raise NotBuilt(f"{path}: not converted into the cache yet")


def checkpoint_arch(path: str | os.PathLike) -> str | None:
    """The architecture a converted checkpoint's sidecar records (registering a generated one), else None."""
    side = Path(f"{path}.json")
    if not side.is_file():
        return None
    info: dict[str, Any] = json_file(side)
    arch, cfg = info.get("arch"), info.get("open_clip_config")
    if arch and cfg and arch not in available_models():
        ensure_arch(arch, cfg, Path(path).parent / "model_configs")
    return arch


def _key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


@contextlib.contextmanager
def _converting(out: Path) -> Iterator[bool]:
    """Held while one process converts into ``out`` (sweeps sharing a cache folder may convert the
    same checkpoint at once): yields whether the conversion is still to do once the lock is held,
    after deleting the temporary files a killed conversion left (as large as the model; only with
    the lock held: a cache whose lock file this process cannot open is converted into unlocked,
    and a temporary there may be another process's, being written). The lock
    files are a fixed set of 16 in ``checkpoints.locks/``, beside the store."""
    lock = out.parent.with_name(out.parent.name + ".locks") / f"{out.name[0]}.lock"
    with build_lock(lock, f"{out.name}: waiting for another process that is converting this checkpoint") as held:
        if _complete(out):
            yield False
            return
        for path in (out, Path(f"{out}.json")) if held else ():  # unlocked, a temporary may be a live writer's
            remove_stale_temporaries(path)
        yield True


def _complete(out: Path) -> bool:
    """A finished conversion: the sidecar is written last, so its presence marks one; a converted
    file truncated or emptied since is converted again (every sweep refused it, naming it)."""
    return Path(f"{out}.json").is_file() and whole_safetensors(out)


def _in_layout(path: Path, kind: Kind) -> bool:
    """Whether ``path`` already is what a sweep loads (safetensors read by header; .pt weights-only)."""
    if is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as fh:
                keys = set(fh.keys())
        except Exception:
            return False  # let the converter report the file
    else:
        try:
            keys = set(load_state_dict(path))
        except HarnessError:
            return False
    need = _CLIP_KEYS if kind == "clip" else _ENCODER_KEYS
    return all(k in keys for k in need) and (kind == "clip" or not any(k.startswith("visual.") for k in keys))
