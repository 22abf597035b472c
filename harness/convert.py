"""Import task_vectors-style checkpoints into plain tensors (safetensors + a JSON sidecar).

The published task-arithmetic checkpoints (``zeroshot.pt``, ``<Dataset>/finetuned.pt``,
``head_<Dataset>.pt``) are whole pickled modules: loading them runs whatever code the pickle
names. This module is the one place that may unpickle, and only when the caller passes
``trust_pickle=True``; files that already are plain tensor dicts (or safetensors) convert
without it. The output is what the rest of the harness loads without unpickling:

- an image encoder becomes ``clip.visual.state_dict()`` keys (task_vectors' ``ImageEncoder``
  keeps the open_clip CLIP under ``model``, so its ``model.visual.*`` keys are re-rooted), checked
  against an open_clip architecture that is inferred from the tensors (and, for pickled modules,
  from the activation and head count, so OpenAI-initialised QuickGELU models map to the
  ``-quickgelu`` configs) or given;
- a classification head (task_vectors' ``ClassificationHead``, a ``Linear`` with zero bias over
  normalised features) becomes ``{"head": weight}``, the ``[classes, dim]`` tensor that
  :class:`harness.models.ImageClassifier` takes.

Next to ``<dst>`` goes ``<dst>.json``: kind, architecture, source path and the source's sha256.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import pickle
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from harness.cache import atomic_write_json, finite_json, read_json
from harness.errors import HarnessError
from harness.models import (
    build_clip,
    describe_state,
    file_digest,
    header_metadata,
    is_safetensors,
    load_state_dict,
    open_clip_module,
    refuse_integer_weights,
    resolve_arch,
    save_state_dict,
    state_dtypes,
    torch_load_tensors,
    unreadable_reason,
    weights_only_reason,
    whole_safetensors,
)

logger = logging.getLogger(__name__)

FORMAT = "harness-checkpoint/1"
_VIT_KEYS = ("conv1.weight", "class_embedding")
_ARCH_HINT = "--arch (in Python: pass arch=...)"
_PLAIN_VISION_CFG = {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"}


def convert_pickled_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, trust_pickle: bool = False,
                               arch: str | None = None, overwrite: bool = False,
                               kept: Callable[[Path], None] | None = None) -> Path:
    """Convert ``src`` into safetensors at ``dst`` (a file, or a folder to put ``<stem>.safetensors``).

    Without ``trust_pickle`` only plain tensor files are read (``torch.load(weights_only=True)``
    or safetensors); a pickled module raises :class:`HarnessError` before anything is unpickled.
    An existing destination is kept as :func:`write_checkpoint` says (``overwrite``, ``kept``).
    Returns the path of the safetensors file; the sidecar is that path plus ``.json``.
    """
    src = Path(src)
    if src.is_dir():
        raise HarnessError(f"{src}: is a folder, not a checkpoint file (harness import converts a folder of them)")
    if not src.is_file():
        raise HarnessError(f"{src}: checkpoint file does not exist")
    out = output_path(dst, src.stem)
    digest = refuse_file_output(src, out, overwrite)  # before _load: a trusted pickle runs code as it is read
    obj, source_format, unresolved = _load(src, trust_pickle)
    kind, state, info = _extract(obj, src)
    if kind == "image_encoder":
        arch = _check_arch(state, arch, info, src)
        refuse_integer_weights(state_dtypes(state), src)  # written as it is, every sweep would cast it
    generated = generated_config(arch)
    sidecar = {
        "format": FORMAT,
        "kind": kind,
        "arch": arch,
        **({"open_clip_config": generated} if generated else {}),
        **info,
        "source": str(src.resolve()),
        "source_sha256": digest,
        "source_bytes": src.stat().st_size,
        "source_format": source_format,
        "unresolved_classes": sorted(unresolved),
        "tensors": len(state),
        "parameters": sum(v.numel() for v in state.values()),
        "dtypes": sorted(set(state_dtypes(state).values())),
        "state_digest": describe_state(state),
    }
    metadata = {"format": FORMAT, "kind": kind, "arch": arch or "", "source_sha256": digest}
    if generated:
        metadata["open_clip_config"] = json.dumps(generated, sort_keys=True)
    write_checkpoint(state, out, metadata, sidecar, overwrite, kept)
    return out


def generated_config(arch: str | None) -> dict[str, Any] | None:
    """The open_clip config of a generated ``hf-vit-...`` architecture (registered by then), which
    a conversion records in its header and sidecar as ``harness import`` does: no shipped config
    has it, so without it the output could not be built, nor converted again, on its own."""
    if not arch or not arch.startswith("hf-vit-"):
        return None
    return open_clip_module().get_model_config(arch)


def write_checkpoint(state: dict[str, torch.Tensor], out: Path, metadata: dict[str, str], sidecar: dict[str, Any],
                     overwrite: bool = False, kept: Callable[[Path], None] | None = None) -> None:
    """Write a converted checkpoint to ``out``, then its sidecar (last: it marks a finished
    conversion), each atomically. A file already at ``out`` is a checkpoint someone may need: one
    with other content is refused unless ``overwrite``, naming it; one with the same tensors and
    metadata is kept, so rerunning a conversion succeeds: only its sidecar is written where it has
    none or another (a replacing conversion killed between the two writes leaves the replaced
    one's, naming its source and architecture), else nothing, and ``kept`` is called with ``out``."""
    side = out.with_name(out.name + ".json")
    refuse_folder(out)
    if out.exists() and not overwrite:
        if not _holds(out, state, {k: str(v) for k, v in metadata.items()}):
            raise _not_replaced(out)
        if read_json(side) != json.loads(json.dumps(finite_json(sidecar), default=str)):  # as written
            atomic_write_json(side, sidecar)  # written, so not reported as kept
        elif kept is not None:
            kept(out)
        return
    save_state_dict(state, out, metadata=metadata)
    atomic_write_json(side, sidecar)


def refuse_file_output(src: Path, out: Path, overwrite: bool = False) -> str:
    """Refuse ``out`` as the output of the checkpoint file ``src`` for all that is told before
    ``src`` is read (the source file itself, overwrite or not; then :func:`refuse_other_source`);
    returns ``src``'s sha256. :func:`convert_pickled_checkpoint` calls it first, and ``harness
    import`` of a folder of checkpoints for each file in it before converting any."""
    if out.exists() and out.resolve() == src.resolve():
        raise HarnessError(f"{src}: destination is the source file itself")
    digest = file_digest(src)
    refuse_other_source(out, digest, overwrite)
    return digest


def refuse_other_source(out: Path, source_sha256: str, overwrite: bool = False) -> None:
    """Refuse ``out`` as :func:`write_checkpoint` would, before the source is read: a folder there,
    and (without ``overwrite``) a file that is no conversion of the source with this sha256, are
    refused whatever the source holds, so a trusted pickle is not unpickled (running its code),
    nor a large folder's weights read, only to be refused. A conversion of the same source is
    left to :func:`write_checkpoint`, which compares its content."""
    refuse_folder(out)
    if overwrite or not out.exists():
        return
    if not whole_safetensors(out) or header_metadata(out).get("source_sha256") != source_sha256:
        raise _not_replaced(out)


def _not_replaced(out: Path) -> HarnessError:
    """The error for an existing ``out`` that holds something else than the conversion to write."""
    held = "another checkpoint" if whole_safetensors(out) else "a file that is no safetensors checkpoint"
    return HarnessError(f"{out}: exists and holds {held}; not replaced (pass --overwrite to "
                        "replace it, in Python overwrite=True, or name another destination)")


def refuse_folder(out: Path) -> None:
    """A folder where an output file goes is never replaced, ``overwrite`` or not (it may hold
    anything), nor written into as if it were the destination folder."""
    if out.is_dir():
        raise HarnessError(f"{out}: is a folder, not a checkpoint file to write (move it, or name another destination)")


def _holds(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> bool:
    """Whether the file ``path`` holds ``state`` (names, dtypes, shapes, bytes) under ``metadata``.
    Compared by content, not bytes: safetensors writes the metadata in no fixed order."""
    if not whole_safetensors(path) or header_metadata(path) != metadata:
        return False
    from safetensors.torch import load_file

    there = load_file(str(path))
    return state_dtypes(there) == state_dtypes(state) and describe_state(there) == describe_state(state)


def output_path(dst: str | os.PathLike, name: str) -> Path:
    """``dst`` itself, or ``dst/<name>.safetensors`` when ``dst`` is (or ends like) a folder: taken
    as given, since ``Path`` drops the trailing slash that says ``ckpt/`` is a folder to make."""
    if Path(dst).is_dir() or os.fspath(dst).endswith(("/", os.sep)):
        return Path(dst) / f"{name}.safetensors"
    return Path(dst)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


class _Unresolved(nn.Module):
    """Stand-in for a class a trusted pickle names but this environment lacks.

    task_vectors pickles reference ``src.modeling.ImageEncoder`` (their repository's own
    module); the tensors inside are all that is needed, so such classes become empty modules
    that accept the pickled attributes (of a plain object, its modules become submodules).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            state = {**(state[0] or {}), **(state[1] or {})}  # (__dict__, __slots__) form
        if isinstance(state, dict) and "_parameters" in state:  # a pickled nn.Module
            super().__setstate__(state)
            return
        # a plain object: its modules become submodules (an encoder inside is found as in a
        # module); its other attributes are kept aside, where none can hide a module's method
        nn.Module.__init__(self)
        for key, value in (state.items() if isinstance(state, dict) else ()):
            if isinstance(value, nn.Module) and isinstance(key, str) and key.isidentifier() and not hasattr(self, key):
                self.add_module(key, value)
        self.__dict__["_pickled_state"] = state


def _lenient_pickle_module(unresolved: set[str]) -> types.SimpleNamespace:
    """A ``pickle_module`` for ``torch.load`` whose unpickler stubs classes it cannot import."""
    stubs: dict[str, type] = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                key = f"{module}.{name}"
                unresolved.add(key)
                if key not in stubs:
                    stubs[key] = type(name, (_Unresolved,), {"__module__": module, "__qualname__": name})
                return stubs[key]

    return types.SimpleNamespace(Unpickler=Unpickler, load=pickle.load, __name__="harness_lenient_pickle")


def _load(src: Path, trust_pickle: bool) -> tuple[Any, str, set[str]]:
    if is_safetensors(src):
        return load_state_dict(src), "safetensors", set()
    try:
        return torch_load_tensors(src), "tensors", set()
    except Exception as exc:
        damage = unreadable_reason(src, exc)
        if damage is not None:  # no pickle in it to trust: unpickling would not read it either
            raise HarnessError(f"{src}: not a readable checkpoint: {damage}") from None
        reason = weights_only_reason(exc, src)
    if not trust_pickle:
        raise HarnessError(
            f"{src}: not a plain tensor checkpoint ({reason}); it holds pickled Python objects "
            "(task_vectors checkpoints are whole pickled modules). Unpickling runs any code the "
            "file contains, so it was not loaded. If you trust where the file comes from, convert "
            "it with trust_pickle=True (CLI: `harness convert SRC DST --trust-pickle`, or `harness import SRC DST "
            "--trust-pickle` for a folder of them)"
        )
    logger.warning(
        "%s: unpickling with torch.load(weights_only=False) because trust_pickle=True; this "
        "executes code from the file, do it only for files from a source you trust", src,
    )
    unresolved: set[str] = set()
    try:
        obj = torch.load(str(src), map_location="cpu", weights_only=False, pickle_module=_lenient_pickle_module(unresolved))
    except Exception as exc:
        raise HarnessError(f"{src}: could not unpickle ({type(exc).__name__}: {exc})") from None
    if unresolved:
        logger.warning("%s: classes not importable here, loaded as plain modules: %s", src, ", ".join(sorted(unresolved)))
    return obj, "pickle", unresolved


# ---------------------------------------------------------------------------------------------
# What the checkpoint holds
# ---------------------------------------------------------------------------------------------


def _qualname(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _extract(obj: Any, src: Path) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
    """(kind, output tensors, sidecar facts) for an encoder module/state or a linear head."""
    info: dict[str, Any] = {"container": _qualname(obj)}
    module: nn.Module | None = None
    if isinstance(obj, nn.Module):
        module = obj
        sd = obj.state_dict()
    elif isinstance(obj, Mapping):
        if isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise HarnessError(f"{src}: expected a dict of tensors, found {type(obj[bad[0]]).__name__} under {bad[0]!r}")
        sd = dict(obj)
    else:
        raise HarnessError(f"{src}: holds a {_qualname(obj)}, not an nn.Module or a dict of tensors")

    prefixes = sorted(
        k[: -len(_VIT_KEYS[0])] for k in sd
        if (k == _VIT_KEYS[0] or k.endswith("." + _VIT_KEYS[0])) and k[: -len(_VIT_KEYS[0])] + _VIT_KEYS[1] in sd
    )
    if len(prefixes) > 1:
        raise HarnessError(f"{src}: holds several ViT image encoders (under {', '.join(repr(p) for p in prefixes)})")
    if prefixes:
        prefix = prefixes[0]
        state = {k[len(prefix):]: v.detach().clone() for k, v in sd.items() if k.startswith(prefix)}
        info["prefix"] = prefix
        if module is not None:
            # by attribute: a TorchScript module (OpenAI's released .pt files) has no get_submodule
            visual = functools.reduce(getattr, prefix.rstrip(".").split("."), module) if prefix else module
            info["activation"], info["heads"] = _activation(visual), _num_heads(visual)
        return "image_encoder", state, info

    if set(sd) <= {"weight", "bias"} and "weight" in sd and sd["weight"].ndim == 2:
        weight, bias = sd["weight"], sd.get("bias")
        state = {"head": weight.detach().clone()}
        nonzero_bias = bias is not None and bool(bias.abs().max() > 0)
        if nonzero_bias:
            state["bias"] = bias.detach().clone()
            logger.warning("%s: head has a non-zero bias, kept as 'bias'; a sweep refuses it (logits have no bias)", src)
        info["head"] = {
            "classes": int(weight.shape[0]),
            "dim": int(weight.shape[1]),
            "normalize": getattr(module, "normalize", None),
            "bias": "none" if bias is None else ("nonzero" if nonzero_bias else "zero"),
        }
        return "head", state, info

    raise HarnessError(
        f"{src}: neither a ViT image encoder (no '<prefix>conv1.weight' with '<prefix>class_embedding') "
        f"nor a linear head ('weight' [classes, dim]); keys start {sorted(sd)[:4]}"
    )


def _class_name(module: nn.Module) -> str:
    """The module's class name; a TorchScript module's is its ``original_name``."""
    return getattr(module, "original_name", None) or type(module).__name__


def _activation(visual: nn.Module) -> str | None:
    names = {_class_name(m) for m in visual.modules()}
    if "QuickGELU" in names:
        return "quick_gelu"
    if "GELU" in names:
        return "gelu"
    return None


def _num_heads(visual: nn.Module) -> int | None:
    for m in visual.modules():
        heads = getattr(m, "num_heads", None)
        if "Attention" in _class_name(m) and isinstance(heads, int):
            return heads
    return None


# ---------------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------------


def _shape_summary(state: dict[str, torch.Tensor], src: Path) -> dict[str, Any]:
    try:
        conv = state["conv1.weight"]
        tokens = state["positional_embedding"].shape[0]
        width, patch = int(conv.shape[0]), int(conv.shape[-1])
        layers = len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})
        hidden = int(state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    except (KeyError, IndexError) as exc:
        raise HarnessError(f"{src}: not an open_clip VisionTransformer state (missing {exc})") from None
    grid = math.isqrt(tokens - 1)
    return {
        "image_size": grid * patch, "layers": layers, "width": width, "patch_size": patch,
        "mlp_hidden": hidden, "embed_dim": int(state["proj"].shape[1]) if "proj" in state else None,
    }


def infer_arch(state: dict[str, torch.Tensor], activation: str | None = None, heads: int | None = None, src: Path | str = "<state>") -> str:
    """The open_clip architecture whose image tower has these shapes (and activation/heads).

    Configs that differ only in their text tower count as one; if distinct towers remain
    (e.g. GELU vs QuickGELU from a plain state dict), the caller must name the architecture.
    """
    open_clip = open_clip_module()
    want = _shape_summary(state, Path(src))
    towers: dict[tuple, list[str]] = {}
    for name in open_clip.list_models():
        cfg = open_clip.get_model_config(name) or {}
        vc = cfg.get("vision_cfg") or {}
        if not vc or set(vc) - _PLAIN_VISION_CFG or (cfg.get("text_cfg") or {}).get("hf_model_name"):
            continue  # exotic towers, and text towers that would need a hub to build
        size = vc.get("image_size")
        if isinstance(size, (list, tuple)):
            if len(set(size)) != 1:
                continue
            size = size[0]
        width, head_width, ratio = vc.get("width"), vc.get("head_width", 64), vc.get("mlp_ratio", 4.0)
        have = {
            "image_size": size, "layers": vc.get("layers"), "width": width, "patch_size": vc.get("patch_size"),
            "mlp_hidden": int(width * ratio), "embed_dim": cfg.get("embed_dim") if want["embed_dim"] is not None else None,
        }
        quick = bool(cfg.get("quick_gelu", False))
        if have != want:
            continue
        if activation is not None and quick != (activation == "quick_gelu"):
            continue
        if heads is not None and width // head_width != heads:
            continue
        towers.setdefault((head_width, quick), []).append(name)
    if not towers:
        raise HarnessError(f"{src}: no known open_clip architecture has an image tower with {want}; "
                           f"name it with {_ARCH_HINT}")
    if len(towers) > 1:
        names = sorted(n for group in towers.values() for n in group)
        raise HarnessError(
            f"{src}: the tensors fit several architectures that compute differently "
            f"({', '.join(names[:6])}): activation/heads are not recorded in the file; name the architecture "
            f"with {_ARCH_HINT}"
        )
    # same image tower, different text towers: prefer the family name (ViT-L-14 over ViT-L-14-worldwide)
    return min(next(iter(towers.values())), key=lambda n: (not n.startswith(("ViT-", "harness-")), len(n), n))


def recorded_arch(src: Path) -> str | None:
    """The architecture a converted source records (its ``<file>.json`` sidecar, else its
    safetensors header: what ``harness import`` writes), else None. Inferring from shapes alone
    cannot find a generated ``hf-vit-...`` config that is not registered in this process."""
    arch = _arch_of(harness_sidecar(src))
    if not arch and is_safetensors(src):
        arch = _arch_of(_written_by_harness(header_metadata(src)))
    return arch


def harness_sidecar(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``<path>.json`` sidecar that ``harness convert`` or ``harness import`` wrote; None when
    there is none, it does not read, or another tool wrote it (:func:`_written_by_harness`)."""
    try:
        info = json.loads(Path(f"{path}.json").read_text())
    except (OSError, ValueError):
        return None
    return _written_by_harness(info)


def _written_by_harness(info: Any) -> dict[str, Any] | None:
    """``info`` when the harness wrote it (its ``format`` says so), else None: another tool's
    "arch" or "source" is a name of its own, not what a conversion checked."""
    return info if isinstance(info, dict) and str(info.get("format", "")).startswith("harness") else None


def _arch_of(info: dict[str, Any] | None) -> str | None:
    arch = info.get("arch") if info else None
    return arch if isinstance(arch, str) and arch else None


def _check_arch(state: dict[str, torch.Tensor], arch: str | None, info: dict[str, Any], src: Path) -> str:
    """Infer or verify the architecture by building it and comparing its image tower."""
    activation, heads = info.get("activation"), info.get("heads")
    if arch is None:
        arch = recorded_arch(src) or infer_arch(state, activation, heads, src)
    resolve_arch(arch, [src])  # a generated hf-vit-... name: from the source's sidecar, header or model_configs/
    visual = build_clip(arch).visual
    ref = visual.state_dict()
    missing = [k for k in ref if k not in state]
    unexpected = [k for k in state if k not in ref]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(ref[k].shape)}" for k in ref if k in state and state[k].shape != ref[k].shape]
    if missing or unexpected or shapes:
        raise HarnessError(
            f"{src}: image encoder does not match {arch!r}: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}, shape mismatches {shapes[:3]}"
        )
    ref_act, ref_heads = _activation(visual), _num_heads(visual)
    if activation is not None and ref_act is not None and activation != ref_act:
        raise HarnessError(
            f"{src}: the encoder uses {activation} but {arch!r} uses {ref_act}; pick the matching "
            f"config (OpenAI-initialised models need a '-quickgelu' architecture)"
        )
    if heads is not None and ref_heads is not None and heads != ref_heads:
        raise HarnessError(f"{src}: the encoder has {heads} attention heads but {arch!r} has {ref_heads}")
    return arch
