"""Hugging Face ``transformers`` CLIP folders -> open_clip state dicts (safetensors + JSON sidecar).

Published fine-tuned CLIPs (e.g. the 8-task ``clip-vit-base-patch32_<task>`` repositories) are
``transformers`` folders: ``config.json`` + ``model.safetensors``. They are plain tensors, so they
are read directly (no unpickling, no trust flag, no ``transformers`` import, no hub) and renamed
into open_clip's layout:

=============================================  =============================================
HF (``vision_model.`` / ``text_model.``)       open_clip (``clip.visual`` / ``clip``)
=============================================  =============================================
embeddings.patch_embedding.weight              conv1.weight
embeddings.class_embedding                     class_embedding
embeddings.position_embedding.weight           positional_embedding
pre_layrnorm / post_layernorm                  ln_pre / ln_post
encoder.layers.i.layer_norm1 / layer_norm2     transformer.resblocks.i.ln_1 / ln_2
encoder.layers.i.self_attn.{q,k,v}_proj        transformer.resblocks.i.attn.in_proj_* (q;k;v)
encoder.layers.i.self_attn.out_proj            transformer.resblocks.i.attn.out_proj
encoder.layers.i.mlp.fc1 / fc2                 transformer.resblocks.i.mlp.c_fc / c_proj
visual_projection.weight                       proj (transposed: open_clip computes x @ proj)
text: token_embedding, final_layer_norm,       token_embedding, ln_final, text_projection
text_projection.weight, logit_scale            (transposed), logit_scale
=============================================  =============================================

A ``CLIPVisionModel`` folder has no ``visual_projection`` (fine-tuning kept the pretrained one
frozen and outside the vision tower), so its projection is taken from a separate source, normally
the pretrained ``CLIPModel`` folder. ``hidden_act`` picks the open_clip activation: ``quick_gelu``
(OpenAI weights) maps to a ``-quickgelu`` architecture, ``gelu`` to the plain one. Sizes that
match no shipped open_clip config get a generated ``hf-vit-...`` config, written as
``model_configs/<arch>.json`` next to the output, recorded in the sidecar and the safetensors
header (``arch`` + ``open_clip_config``) and registered with ``open_clip``, so
:func:`harness.models.build_clip` builds it by name, in a later process too (it reads the config
beside the pretrained file). Given that name as ``arch``, a folder of those sizes converts under it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from harness.convert import FORMAT, output_path, refuse_other_source, write_checkpoint
from harness.errors import HarnessError
from harness.models import (file_digest, load_state_dict, open_clip_module, refuse_integer_weights,
                            register_model_config, resolve_arch, state_dtypes, tensor_shapes)

Kind = Literal["image_encoder", "clip"]

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_HF_MODEL_TYPES = {"clip", "clip_vision_model"}
# transformers' CLIPVisionConfig / CLIPTextConfig defaults: config.json files may list only
# the values that differ from them.
_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "image_size": 224, "patch_size": 32,
                    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "num_channels": 3}
_TEXT_DEFAULTS = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                  "num_attention_heads": 8, "max_position_embeddings": 77, "vocab_size": 49408,
                  "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}  # hidden_act -> open_clip quick_gelu
_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
          "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_OPEN_CLIP_TOP = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu"}
# the text tower of a vision-only import: a minimal stand-in, so the config builds a CLIP at all
_PLACEHOLDER_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}


# ---------------------------------------------------------------------------------------------
# Reading a folder
# ---------------------------------------------------------------------------------------------


def hf_folder_of(path: str | os.PathLike) -> Path | None:
    """The ``transformers`` CLIP folder ``path`` is (or whose weights file it is), else None."""
    p = Path(path)
    folder = p if p.is_dir() else p.parent if p.name in WEIGHT_FILES else None
    if folder is None or not (folder / "config.json").is_file():
        return None
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return folder  # reported precisely by read_hf_config
    return folder if isinstance(cfg, dict) and cfg.get("model_type") in _HF_MODEL_TYPES else None


def read_hf_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise HarnessError(f"{path}: missing (a Hugging Face CLIP folder holds config.json + model.safetensors)") from None
    except (OSError, ValueError) as exc:
        raise HarnessError(f"{path}: not readable JSON ({_one_line(exc)})") from None
    if not isinstance(cfg, dict) or cfg.get("model_type") not in _HF_MODEL_TYPES:
        got = cfg.get("model_type") if isinstance(cfg, dict) else type(cfg).__name__
        raise HarnessError(f"{path}: model_type is {got!r}, not a CLIP ('clip' or 'clip_vision_model')")
    return cfg


def weight_files(folder: Path) -> list[Path]:
    """The files holding the folder's tensors (one file, or the shards an index names)."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, AttributeError) as exc:
                raise HarnessError(f"{path}: not a readable shard index ({_one_line(exc)})") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise HarnessError(f"{folder / missing[0]}: shard named by {path.name} is missing")
            return [path] + [folder / s for s in shards]
        return [path]
    raise HarnessError(f"{folder / WEIGHT_FILES[0]}: missing (no {' / '.join(WEIGHT_FILES)} in this Hugging Face folder)")


def tensor_files(folder: Path) -> list[Path]:
    """The folder's files that hold its tensors: its weight files but a shard index."""
    return [p for p in weight_files(folder) if not p.name.endswith(".index.json")]


def read_hf_state(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder, read without unpickling (safetensors, or weights-only torch.load)."""
    state: dict[str, torch.Tensor] = {}
    for path in tensor_files(folder):
        try:
            part = load_state_dict(path)
        except HarnessError as exc:
            raise HarnessError(_one_line(exc)) from None
        state.update(part)
    return state


def source_files(folder: Path) -> list[Path]:
    """The files a conversion of the folder is made from: config.json and its weight files."""
    return [folder / "config.json", *weight_files(folder)]


def source_digests(folder: Path) -> dict[str, str]:
    """sha256 of config.json and of every weights file, by name."""
    return {p.name: file_digest(p) for p in source_files(folder)}


def combined_digest(parts: Mapping[str, str]) -> str:
    return hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(parts.items())).encode()).hexdigest()


def _one_line(exc: BaseException | str) -> str:
    return " ".join(str(exc).split())


# ---------------------------------------------------------------------------------------------
# Key mapping
# ---------------------------------------------------------------------------------------------


def _prefix_of(state: Mapping[str, torch.Tensor], suffix: str, src: Path) -> str | None:
    hits = sorted(k[: -len(suffix)] for k in state if k == suffix or k.endswith("." + suffix))
    if len(hits) > 1:
        raise HarnessError(f"{src}: several towers hold {suffix!r} (under {', '.join(repr(h) for h in hits)})")
    return hits[0] if hits else None


def _take(state: Mapping[str, torch.Tensor], key: str, used: set[str], src: Path) -> torch.Tensor:
    if key not in state:
        raise HarnessError(f"{src}: tensor {key!r} is missing")
    used.add(key)
    return state[key]


def _tower(state: Mapping[str, torch.Tensor], p: str, used: set[str], src: Path) -> tuple[dict[str, torch.Tensor], int]:
    """The encoder layers under ``p`` in open_clip names, and their count."""
    layers = sorted({int(k[len(p) + len("encoder.layers."):].split(".")[0])
                     for k in state if k.startswith(p + "encoder.layers.")})
    if layers != list(range(len(layers))) or not layers:
        raise HarnessError(f"{src}: encoder layers under {p!r} are not numbered 0..n-1 (found {layers[:5]})")
    out: dict[str, torch.Tensor] = {}
    for i in layers:
        hf, oc = f"{p}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for name in ("weight", "bias"):
            out[oc + f"attn.in_proj_{name}"] = torch.cat(
                [_take(state, hf + f"self_attn.{x}_proj.{name}", used, src) for x in "qkv"])
            for h, o in _LAYER.items():
                out[oc + f"{o}.{name}"] = _take(state, hf + f"{h}.{name}", used, src)
    return out, len(layers)


def _ln(state: Mapping[str, torch.Tensor], hf: str, oc: str, used: set[str], src: Path) -> dict[str, torch.Tensor]:
    return {f"{oc}.{n}": _take(state, f"{hf}.{n}", used, src) for n in ("weight", "bias")}


def _sub_config(cfg: Mapping[str, Any], tower: str) -> dict[str, Any] | None:
    if cfg.get("model_type") == "clip_vision_model":
        return dict(cfg) if tower == "vision" else None
    # transformers builds a tower from its _config_dict where there is one, its _config aside
    sub = cfg.get(f"{tower}_config_dict") or cfg.get(f"{tower}_config")
    return dict(sub) if isinstance(sub, dict) else {}


def _checked(cfg: dict[str, Any], defaults: dict[str, Any], derived: dict[str, int], tower: str, src: Path) -> dict[str, Any]:
    """Config values with defaults filled in, after checking them against the tensors' shapes."""
    full = {**defaults, **{k: v for k, v in cfg.items() if v is not None}}
    for key, value in derived.items():
        if key in full and full[key] != value:
            raise HarnessError(f"{src}: config.json says {tower} {key}={full[key]} but the tensors have {value}")
    if full["hidden_act"] not in _ACTIVATIONS:
        raise HarnessError(f"{src}: {tower} hidden_act {full['hidden_act']!r} has no open_clip equivalent "
                           f"(supported: {', '.join(_ACTIVATIONS)})")
    if not math.isclose(float(full["layer_norm_eps"]), 1e-5, rel_tol=1e-6):
        raise HarnessError(f"{src}: {tower} layer_norm_eps={full['layer_norm_eps']} but open_clip's LayerNorm uses 1e-5")
    width, heads = derived["hidden_size"], int(full["num_attention_heads"])
    if width % heads:
        raise HarnessError(f"{src}: {tower} width {width} is not divisible by {heads} attention heads")
    inter = derived["intermediate_size"]
    if int(width * (inter / width)) != inter:
        raise HarnessError(f"{src}: {tower} MLP width {inter} is not expressible as an open_clip mlp_ratio of {width}")
    return full


def _tower_cfg(width: int, layers: int, inter: int) -> dict[str, Any]:
    cfg: dict[str, Any] = {"layers": layers, "width": width}
    if inter != 4 * width:
        cfg["mlp_ratio"] = inter / width
    return cfg


def hf_to_open_clip(
    state: Mapping[str, torch.Tensor],
    config: Mapping[str, Any],
    kind: Kind = "image_encoder",
    projection: torch.Tensor | None = None,
    src: Path | str = "<state>",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(open_clip state dict, open_clip model config) for an HF CLIP state and its config.json.

    ``kind="image_encoder"`` gives ``clip.visual.state_dict()`` keys; ``kind="clip"`` the whole
    ``clip.state_dict()`` (text tower included, which zero-shot heads need). ``projection``
    (``[width, embed_dim]``, open_clip orientation) stands in for a missing ``visual_projection``.
    Every tensor of the source must be used (position-id buffers aside), so an unknown variant
    fails here rather than computing something else.
    """
    src = Path(src)
    used: set[str] = {k for k in state if k.endswith("position_ids")}
    vp = _prefix_of(state, "embeddings.patch_embedding.weight", src)
    if vp is None:
        raise HarnessError(f"{src}: no vision tower (no '*embeddings.patch_embedding.weight' tensor)")
    conv = _take(state, vp + "embeddings.patch_embedding.weight", used, src)
    pos = _take(state, vp + "embeddings.position_embedding.weight", used, src)
    visual = {"conv1.weight": conv, "class_embedding": _take(state, vp + "embeddings.class_embedding", used, src),
              "positional_embedding": pos}
    pre = "pre_layrnorm" if vp + "pre_layrnorm.weight" in state else "pre_layernorm"
    visual.update(_ln(state, vp + pre, "ln_pre", used, src))
    blocks, layers = _tower(state, vp, used, src)
    visual.update(blocks)
    visual.update(_ln(state, vp + "post_layernorm", "ln_post", used, src))

    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    grid = math.isqrt(pos.shape[0] - 1)
    if grid * grid + 1 != pos.shape[0] or conv.shape[-2] != patch or conv.shape[1] != 3:
        raise HarnessError(f"{src}: vision tower is not a square RGB ViT (patch {tuple(conv.shape)}, {pos.shape[0]} positions)")
    v_inter = int(blocks["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
    vcfg = _checked(_sub_config(config, "vision") or {}, _VISION_DEFAULTS,
                    {"hidden_size": width, "num_hidden_layers": layers, "intermediate_size": v_inter,
                     "patch_size": patch, "image_size": grid * patch, "num_channels": 3}, "vision", src)

    outer = vp[: -len("vision_model.")] if vp.endswith("vision_model.") else ""
    proj_key = _prefix_of(state, "visual_projection.weight", src)
    if proj_key is not None:
        visual["proj"] = _take(state, proj_key + "visual_projection.weight", used, src).t().contiguous()
    elif projection is not None:
        if projection.ndim != 2 or projection.shape[0] != width:
            raise HarnessError(f"{src}: the given projection has shape {tuple(projection.shape)}, expected [{width}, embed_dim]")
        visual["proj"] = projection.detach().clone()
    else:
        raise HarnessError(
            f"{src}: a CLIPVisionModel has no visual_projection; give the projection of the model it was "
            "fine-tuned from (projection=<pretrained CLIPModel folder>, CLI: --projection PATH)"
        )
    embed_dim = int(visual["proj"].shape[1])
    quick = _ACTIVATIONS[vcfg["hidden_act"]]
    vision_cfg = _tower_cfg(width, layers, v_inter)
    vision_cfg.update({"image_size": grid * patch, "patch_size": patch,
                       "head_width": width // int(vcfg["num_attention_heads"])})
    oc_cfg: dict[str, Any] = {"embed_dim": embed_dim, "vision_cfg": vision_cfg, "text_cfg": dict(_PLACEHOLDER_TEXT)}

    tp = _prefix_of(state, "embeddings.token_embedding.weight", src)
    if kind == "image_encoder":
        used.update(k for k in state if (tp is not None and k.startswith(tp)) or k.startswith(outer + "text_projection")
                    or k == outer + "logit_scale")
        out = visual
    elif kind == "clip":
        if tp is None:
            raise HarnessError(f"{src}: no text tower (a CLIPVisionModel); a whole CLIP needs a CLIPModel folder")
        tok = _take(state, tp + "embeddings.token_embedding.weight", used, src)
        tpos = _take(state, tp + "embeddings.position_embedding.weight", used, src)
        tblocks, tlayers = _tower(state, tp, used, src)
        t_width = int(tok.shape[1])
        t_inter = int(tblocks["transformer.resblocks.0.mlp.c_fc.weight"].shape[0])
        tcfg = _checked(_sub_config(config, "text") or {}, _TEXT_DEFAULTS,
                        {"hidden_size": t_width, "num_hidden_layers": tlayers, "intermediate_size": t_inter,
                         "vocab_size": int(tok.shape[0]), "max_position_embeddings": int(tpos.shape[0])}, "text", src)
        if _ACTIVATIONS[tcfg["hidden_act"]] != quick:
            raise HarnessError(f"{src}: the towers use different activations ({vcfg['hidden_act']} vs "
                               f"{tcfg['hidden_act']}); open_clip has one switch for both")
        text_proj = _take(state, outer + "text_projection.weight", used, src).t().contiguous()
        if text_proj.shape[1] != embed_dim:
            raise HarnessError(f"{src}: text projection dim {text_proj.shape[1]} != visual projection dim {embed_dim}")
        out = {f"visual.{k}": v for k, v in visual.items()}
        out.update({"token_embedding.weight": tok, "positional_embedding": tpos, "text_projection": text_proj,
                    "logit_scale": _take(state, outer + "logit_scale", used, src).reshape(())})
        out.update(tblocks)
        out.update(_ln(state, tp + "final_layer_norm", "ln_final", used, src))
        text_cfg = _tower_cfg(t_width, tlayers, t_inter)
        text_cfg.update({"context_length": int(tpos.shape[0]), "vocab_size": int(tok.shape[0]),
                         "heads": int(tcfg["num_attention_heads"])})
        oc_cfg["text_cfg"] = text_cfg
    else:
        raise HarnessError(f"unknown checkpoint kind {kind!r} (image_encoder or clip)")
    if quick:
        oc_cfg["quick_gelu"] = True
    left = sorted(set(state) - used)
    if left:
        raise HarnessError(f"{src}: tensors with no open_clip counterpart: {', '.join(left[:4])}"
                           f"{' ...' if len(left) > 4 else ''}")
    return {k: v.contiguous() for k, v in out.items()}, oc_cfg


# ---------------------------------------------------------------------------------------------
# Architecture names
# ---------------------------------------------------------------------------------------------


def _normalised(cfg: Mapping[str, Any], with_text: bool) -> tuple | None:
    """A comparable form of an open_clip config (dataclass defaults filled in), or None if exotic."""
    open_clip_module()
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    if set(cfg) - _OPEN_CLIP_TOP or not isinstance(cfg.get("vision_cfg"), dict):
        return None
    try:
        vision = dataclasses.asdict(CLIPVisionCfg(**cfg["vision_cfg"]))
        text = dataclasses.asdict(CLIPTextCfg(**cfg["text_cfg"])) if with_text else None
    except (TypeError, KeyError):
        return None
    size = vision["image_size"]
    if isinstance(size, (list, tuple)) and len(set(size)) == 1:
        vision["image_size"] = size[0]
    return (cfg.get("embed_dim"), bool(cfg.get("quick_gelu", False)),
            json.dumps(vision, sort_keys=True, default=str), json.dumps(text, sort_keys=True, default=str))


def match_arch(oc_cfg: Mapping[str, Any], kind: Kind) -> str | None:
    """The shipped open_clip architecture computing exactly like ``oc_cfg`` (text tower only for ``clip``)."""
    open_clip = open_clip_module()
    want = _normalised(oc_cfg, kind == "clip")
    hits = [name for name in open_clip.list_models()
            if _normalised(open_clip.get_model_config(name) or {}, kind == "clip") == want]
    if not hits:
        return None
    return min(hits, key=lambda n: (not n.startswith(("ViT-", "harness-")), len(n), n))


def generated_arch_name(oc_cfg: Mapping[str, Any]) -> str:
    v = oc_cfg["vision_cfg"]
    digest = hashlib.sha256(json.dumps(oc_cfg, sort_keys=True).encode()).hexdigest()[:8]
    return (f"hf-vit-w{v['width']}-l{v['layers']}-p{v['patch_size']}-i{v['image_size']}"
            f"{'-quickgelu' if oc_cfg.get('quick_gelu') else ''}-{digest}")


def ensure_arch(name: str, oc_cfg: Mapping[str, Any], config_dir: Path) -> None:
    """Make ``name`` buildable by open_clip in this process (writes ``config_dir/<name>.json`` if needed)."""
    register_model_config(name, dict(oc_cfg), config_dir / f"{name}.json", config_dir=config_dir)


def _sizes(oc_cfg: Mapping[str, Any], kind: Kind) -> str:
    v = oc_cfg["vision_cfg"]
    out = (f"vision width={v['width']} layers={v['layers']} patch={v['patch_size']} image={v['image_size']}, "
           f"embed_dim={oc_cfg['embed_dim']}, {'quick_gelu' if oc_cfg.get('quick_gelu') else 'gelu'}")
    if kind == "clip":
        t = oc_cfg["text_cfg"]
        out += f", text width={t['width']} layers={t['layers']}"
    return out


def check_arch(arch: str, oc_cfg: Mapping[str, Any], kind: Kind, src: Path | str,
               known: Mapping[str, Any] | None = None) -> None:
    """Refuse an architecture name that would compute differently from the checkpoint. ``known``:
    ``arch``'s config where open_clip has not registered it yet (a pretrained folder's generated one)."""
    open_clip = open_clip_module()
    cfg = known if known is not None else open_clip.get_model_config(arch)
    if cfg is None:
        shipped, gen = match_arch(oc_cfg, kind), generated_arch_name(oc_cfg)
        sizes = f"{Path(src) / 'config.json'}: architecture {arch!r} is unknown to open_clip; this " \
                f"folder's config.json and tensors give {_sizes(oc_cfg, kind)}, "
        if shipped:
            raise HarnessError(sizes + f"which is architecture {shipped!r}")
        raise HarnessError(sizes + "which no shipped config has; " + (
            f"their generated architecture is {gen!r}" if kind == "clip" else
            f"as an image encoder they generate {gen!r}, but a sweep's model.arch is the generated name "
            "of its pretrained CLIPModel folder (the 'arch' in the .json sidecar that "
            "`harness import --full` writes for it)"))
    if _normalised(cfg, kind == "clip") != _normalised(oc_cfg, kind == "clip"):
        want = {k: oc_cfg[k] for k in ("embed_dim", "vision_cfg", "quick_gelu") if k in oc_cfg}
        if kind == "clip":
            want["text_cfg"] = oc_cfg["text_cfg"]
        hint = " (OpenAI-initialised models need a '-quickgelu' architecture)" if \
            bool(cfg.get("quick_gelu", False)) != bool(oc_cfg.get("quick_gelu", False)) else ""
        fits = match_arch(oc_cfg, kind) or (generated_arch_name(oc_cfg) if kind == "clip" else None)
        if fits:
            hint = f"; it is architecture {fits!r}" + ("" if fits in open_clip.list_models() else
                                                        " (generated: no shipped config has these sizes)")
        raise HarnessError(f"{src}: the checkpoint is {json.dumps(want, sort_keys=True)}, "
                           f"which architecture {arch!r} does not match{hint}")


def check_given_arch(arch: str, oc_cfg: Mapping[str, Any], kind: Kind, folder: Path,
                     projection: str | os.PathLike | None = None, known: Mapping[str, Any] | None = None) -> bool:
    """Refuse ``arch`` given for a folder of ``oc_cfg``'s sizes, as its conversion does; True when
    it is the name ``harness import`` generates for these sizes (the caller registers it). ``known``:
    as for :func:`check_arch`."""
    if arch == generated_arch_name(oc_cfg):
        return True
    if known is None and open_clip_module().get_model_config(arch) is None and projection is not None:
        try:  # e.g. a converted pretrained file whose sidecar records the generated architecture
            resolve_arch(arch, [projection])
        except HarnessError:
            pass  # check_arch says what the folder would need
    check_arch(arch, oc_cfg, kind, folder, known)
    return False


def folder_open_clip_config(folder: Path, kind: Kind, projection: str | os.PathLike | None = None) -> dict[str, Any]:
    """The open_clip config converting ``folder`` gives, from its config.json and its tensors' names
    and shapes alone (safetensors headers, a ``.bin``'s mapped tensors, taken as meta tensors): no
    tensor's data is read, so a sweep's architecture is checked against a folder before any job.
    ``projection``: as for :func:`convert_hf_checkpoint`, for a folder without one."""
    state = _meta_state(folder)
    proj = None
    if projection is not None and _prefix_of(state, "visual_projection.weight", folder) is None:
        proj = _projection_of(_meta_state(Path(projection)), Path(projection))
    return hf_to_open_clip(state, read_hf_config(folder), kind, proj, folder)[1]


def _meta_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a Hugging Face folder (or its weights file) or of a state file, as meta
    tensors of their shapes: nothing read but headers."""
    folder = hf_folder_of(path)
    files = tensor_files(folder) if folder else [path]
    return {k: torch.empty(shape, device="meta") for f in files for k, shape in tensor_shapes(f).items()}


# ---------------------------------------------------------------------------------------------
# Projection and conversion
# ---------------------------------------------------------------------------------------------


def has_projection(folder: Path) -> bool:
    """Whether the folder holds its own ``visual_projection`` (so a given projection goes unused),
    told from its tensors' names alone (safetensors headers, a ``.bin``'s mapped tensors)."""
    return _prefix_of(_meta_state(folder), "visual_projection.weight", folder) is not None


def projection_digest(path: str | os.PathLike) -> str:
    """sha256 of a projection source (an HF folder's sources together, or a state file), as
    :func:`load_projection` gives it, from the files' bytes: no tensor read."""
    path = Path(path)
    folder = hf_folder_of(path)
    if folder is not None:
        return combined_digest(source_digests(folder))
    if path.is_file():
        return file_digest(path)
    raise HarnessError(f"{path}: projection source does not exist")


def load_projection(path: str | os.PathLike) -> tuple[torch.Tensor, str]:
    """(visual projection ``[width, embed_dim]``, sha256 of its source) from an HF folder or a state file."""
    path = Path(path)
    digest = projection_digest(path)
    folder = hf_folder_of(path)
    state = read_hf_state(folder) if folder is not None else load_state_dict(path)
    return _projection_of(state, path), digest


def _projection_of(state: Mapping[str, torch.Tensor], path: Path) -> torch.Tensor:
    """The visual projection ``[width, embed_dim]`` among ``state``, read from ``path``."""
    hf = _prefix_of(state, "visual_projection.weight", path)
    if hf is not None:
        return state[hf + "visual_projection.weight"].t().contiguous()
    for key in ("proj", "visual.proj", "model.visual.proj"):
        if key in state:
            return state[key]
    raise HarnessError(f"{path}: holds no visual projection ('visual_projection.weight', 'visual.proj' or 'proj')")


def convert_hf_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    kind: Kind = "image_encoder",
    arch: str | None = None,
    projection: str | os.PathLike | None = None,
    verify: bool = False,
    overwrite: bool = False,
    kept: Callable[[Path], None] | None = None,
) -> Path:
    """Convert the HF CLIP folder ``src`` into safetensors at ``dst`` (a file, or a folder for ``<name>.safetensors``).

    The architecture is the shipped open_clip config that computes identically, else a
    generated one (registered, and saved under ``<dst folder>/model_configs``); a given ``arch``
    is checked against the checkpoint (the generated name of its sizes is registered, as without
    one). ``projection`` (HF folder or state file) supplies the visual projection a
    ``CLIPVisionModel`` lacks. ``verify`` compares image features with the ``transformers`` model
    on random images (needs ``transformers``). An existing destination is kept as
    :func:`harness.convert.write_checkpoint` says (``overwrite``, ``kept``). Returns the path;
    the sidecar ``<path>.json`` records arch, open_clip config, sources and their sha256.
    """
    if verify:
        require_transformers()  # before a generated architecture is written under dst's folder
    folder = hf_folder_of(src)
    if folder is None:
        read_hf_config(Path(src) if Path(src).is_dir() else Path(src).parent)  # raises the precise reason
        raise HarnessError(f"{src}: not a Hugging Face CLIP folder")
    out = output_path(dst, folder.name)
    digests = refuse_hf_output(folder, out, overwrite)  # before the weights are read (a large folder's)
    config = read_hf_config(folder)
    state = read_hf_state(folder)
    proj_tensor, proj_digest = (None, None)
    if projection is not None and _prefix_of(state, "visual_projection.weight", folder) is None:
        proj_tensor, proj_digest = load_projection(projection)
    out_state, oc_cfg = hf_to_open_clip(state, config, kind, proj_tensor, folder)
    refuse_integer_weights(state_dtypes(out_state), folder)  # position-id buffers, ints, are not among them
    if arch is None:
        arch = match_arch(oc_cfg, kind)
        if arch is None:
            arch = generated_arch_name(oc_cfg)
            ensure_arch(arch, oc_cfg, out.parent / "model_configs")
    elif check_given_arch(arch, oc_cfg, kind, folder, projection):  # the name import gave these sizes
        ensure_arch(arch, oc_cfg, out.parent / "model_configs")
    sidecar: dict[str, Any] = {
        "format": FORMAT,
        "kind": kind,
        "arch": arch,
        "open_clip_config": oc_cfg,
        "source": str(folder.resolve()),
        "source_format": "huggingface",
        "source_architectures": config.get("architectures"),
        "source_files": digests,
        "source_sha256": combined_digest(digests),
        "hidden_act": "quick_gelu" if oc_cfg.get("quick_gelu") else "gelu",
        "tensors": len(out_state),
        "parameters": sum(v.numel() for v in out_state.values()),
        "dtypes": sorted(set(state_dtypes(out_state).values())),
    }
    if proj_tensor is not None:
        sidecar["projection_source"] = str(Path(projection).resolve())
        sidecar["projection_sha256"] = proj_digest
    if verify:
        sidecar["verified_max_abs_diff"] = verify_against_transformers(folder, arch, out_state, kind)
    write_checkpoint(out_state, out, {"format": FORMAT, "kind": kind, "arch": arch,
                                      "source_sha256": sidecar["source_sha256"],
                                      "open_clip_config": json.dumps(oc_cfg, sort_keys=True)},
                     sidecar, overwrite, kept)
    return out


def refuse_hf_output(folder: Path, out: Path, overwrite: bool = False) -> dict[str, str]:
    """Refuse ``out`` as the output of the Hugging Face folder ``folder`` for all that is told before
    its weights are read: an output inside the folder, or one of its files (a weights file may be a
    link out of it, as in the hub's cache), overwrite or not; then
    :func:`harness.convert.refuse_other_source`. Returns :func:`source_digests`.
    :func:`convert_hf_checkpoint` calls it first, and ``harness import`` of a folder of
    checkpoints for each Hugging Face folder in it before converting any."""
    _refuse_inside(out, folder)
    if out.resolve() in {f.resolve() for f in source_files(folder)}:
        raise HarnessError(f"{out}: the destination is one of the source files")
    digests = source_digests(folder)
    refuse_other_source(out, combined_digest(digests), overwrite)
    return digests


def _refuse_inside(out: Path, folder: Path) -> None:
    """Refuse an output inside the Hugging Face folder it is converted from: what is written there
    changes the folder (its ``model_configs/`` too), and a ``model.safetensors`` beside a
    ``pytorch_model.bin`` or a shard index becomes the folder's weights, which no longer convert."""
    if folder.resolve() in out.resolve().parents:
        raise HarnessError(f"{out}: is inside {folder}, the Hugging Face folder it is converted from; "
                           "name a destination outside that folder")


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise HarnessError("this needs the optional `transformers` package: pip install -e '.[hf]'") from None
    return transformers


@torch.no_grad()
def verify_against_transformers(folder: Path, arch: str, state: Mapping[str, torch.Tensor], kind: Kind,
                                images: int = 2, tol: float = 1e-4) -> float:
    """Max abs difference of image features, ``transformers`` model vs converted open_clip, on random images."""
    from harness.models import build_clip

    transformers = require_transformers()
    config = read_hf_config(folder)
    name = (config.get("architectures") or ["CLIPVisionModel" if config["model_type"] == "clip_vision_model" else "CLIPModel"])[0]
    cls = getattr(transformers, name, None)
    if cls is None or not name.startswith("CLIP"):
        raise HarnessError(f"{folder}: cannot verify a {name!r} with transformers")
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        model = cls.from_pretrained(str(folder), local_files_only=True).float().eval()
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    clip = build_clip(arch)
    visual_state = {k.removeprefix("visual."): v for k, v in state.items() if kind == "image_encoder" or k.startswith("visual.")}
    clip.visual.load_state_dict(visual_state)
    size = clip.visual.image_size[0] if isinstance(clip.visual.image_size, (tuple, list)) else clip.visual.image_size
    x = torch.randn(images, 3, size, size, generator=torch.Generator().manual_seed(0))
    if hasattr(model, "get_image_features"):
        ref = model.get_image_features(pixel_values=x)
        ref = ref if isinstance(ref, torch.Tensor) else ref.pooler_output
    elif hasattr(model, "visual_projection"):
        ref = model(pixel_values=x).image_embeds
    else:
        ref = model(pixel_values=x).pooler_output @ visual_state["proj"].float()
    diff = float((clip.visual.float()(x) - ref).abs().max())
    if not diff <= tol * max(1.0, float(ref.abs().max())):
        raise HarnessError(f"{folder}: converted model's image features differ from transformers' by {diff:.3g}")
    return diff
