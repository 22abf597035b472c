"""open_clip models, checkpoints and zero-shot classification heads.

Everything loads from local files: open_clip architectures by name (ViT-B-32, ViT-L-14, the
project's tiny configs in ``harness/model_configs``, and the ``hf-vit-...`` configs that
``harness import`` generates, read from beside the converted pretrained file), pretrained weights from a file or
from an open_clip tag already in the local cache, fine-tuned image encoders from safetensors
(or ``torch.load(weights_only=True)``). Nothing here reaches for a hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import pickle
import re
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from harness.cache import atomic_path, atomic_write_bytes, current_umask, record_digest
from harness.errors import HarnessError, did_you_mean

CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False
# open_clip modules that import transformers at module level, for Hugging Face text towers and
# CoCa caption generation only; each binds the named attribute only when that import succeeded
_TRANSFORMERS_ADAPTERS = {"open_clip.hf_model": "AutoConfig", "open_clip.coca_model": "BeamSearchScorer"}


def open_clip_module() -> ModuleType:
    """open_clip, with the project's configs registered, imported without ``transformers``.

    open_clip's Hugging Face adapter imports ``transformers`` when open_clip is imported
    (1-2 s measured here, in every process: the driver, each worker, each SLURM job) though
    only models with a Hugging Face text tower use it. Hiding it for that one import makes the
    adapter fall back to its no-``transformers`` branch; :func:`build_clip` reloads the adapter
    before building a model that needs it."""
    global _registered
    hide = "open_clip" not in sys.modules and "transformers" not in sys.modules
    if hide:
        sys.modules["transformers"] = None  # type: ignore[assignment]  # `import transformers` raises ImportError
    try:
        import open_clip
    finally:
        if hide and sys.modules.get("transformers", 0) is None:
            del sys.modules["transformers"]
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True
    return open_clip


def enable_hf_text_towers() -> None:
    """Give open_clip's ``transformers`` adapters their ``transformers`` (a no-op when they have it)."""
    open_clip_module()
    if importlib.util.find_spec("transformers") is None:
        return  # open_clip itself says to install it when such a model is built
    for name, marker in _TRANSFORMERS_ADAPTERS.items():
        module = sys.modules.get(name)
        if module is not None and marker not in vars(module):
            importlib.reload(module)  # same module dict: open_clip's references to its classes see the import


def available_models() -> list[str]:
    return list(open_clip_module().list_models())


def config_arch_names() -> list[str]:
    """The architectures open_clip and ``harness/model_configs`` ship a config for, read from
    their config folders, so a sweep's ``arch`` is checked without importing open_clip
    (seconds); in a process that imported it, also the ones registered since."""
    if "open_clip" in sys.modules:
        return available_models()
    return sorted({p.stem for folder in _config_folders() for p in folder.glob("*.json")})


def _config_folders() -> list[Path]:
    """The harness's architecture configs and open_clip's, found without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    return [CONFIG_DIR] + ([Path(spec.origin).parent / "model_configs"] if spec and spec.origin else [])


def arch_config(arch: str) -> dict[str, Any] | None:
    """The open_clip config of ``arch`` (None when none is found), read from the config folders
    without importing open_clip, as :func:`config_arch_names` lists them."""
    if "open_clip" in sys.modules:
        return open_clip_module().get_model_config(arch)
    for folder in _config_folders():
        path = folder / f"{arch}.json"
        if path.is_file():
            return json.loads(path.read_text())
    return None


def unknown_arch_problem(arch: str) -> str | None:
    """Why ``arch`` names no architecture (with the closest name), or None. Generated
    ``hf-vit-...`` names pass: they are read from beside the checkpoints when the sweep runs."""
    if arch.startswith("hf-vit-"):
        return None
    names = config_arch_names()
    if arch in names:
        return None
    return f"unknown open_clip architecture{did_you_mean(arch, names)} (`harness list models` lists them)"


def is_safetensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` is read as safetensors: by its suffix, or by its content whatever its name
    (an 8-byte little-endian header length, then a JSON object), so a converted file saved
    without the suffix is never handed to ``torch.load``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
            size = os.fstat(fh.fileno()).st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8


#: Why a TorchScript archive is refused as a plain tensor checkpoint (:func:`weights_only_reason`).
TORCHSCRIPT_REASON = ("a TorchScript archive (torch.jit.save, as OpenAI's released CLIP .pt files are): it holds "
                      "code as well as tensors; open_clip's tag 'openai' names OpenAI's weights")


def unreadable_reason(path: Path, exc: Exception) -> str | None:
    """Why ``torch.load(weights_only=True)`` failed, when the file is empty, truncated or not a
    torch checkpoint at all; None when it refused pickled Python objects (only those are worth
    converting with ``--trust-pickle``: unpickling a damaged file would not help)."""
    if path.stat().st_size == 0:
        return "the file is empty"
    if not _torch_file_start(path):
        return "not a torch checkpoint (it starts neither as a zip archive nor as an older torch.save file)"
    if is_torchscript(path):
        return None
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in str(exc):
        return None
    detail = " ".join(str(exc).split())[:160] or "no detail"
    return f"truncated or corrupt ({type(exc).__name__}: {detail})"


def weights_only_reason(exc: Exception, path: Path | None = None) -> str:
    """What torch's weights-only unpickler rejected (an unsupported global, a blocked module's
    global such as ``posix.system``, a call or an operand), without torch's advice to allowlist
    it, which would load the module unconverted. torch re-raises the unpickler's own error inside
    its advice; that error, kept as the exception's context, is the part that names the item."""
    if path is not None and is_torchscript(path):
        return TORCHSCRIPT_REASON
    inner = exc.__context__
    if isinstance(inner, pickle.UnpicklingError) and str(inner).strip():
        detail = str(inner)
    elif "WeightsUnpickler error:" in str(exc):
        detail = str(exc).split("WeightsUnpickler error:", 1)[1]
    else:
        return type(exc).__name__
    detail = " ".join(detail.split(". Please use", 1)[0].split("Check the documentation", 1)[0].split())
    return f"WeightsUnpickler error: {detail.removesuffix('.')[:200]}"


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip holding ``constants.pkl``), which
    ``torch.load(weights_only=True)`` refuses whole: code to trust, not a damaged file."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _torch_file_start(path: Path) -> bool:
    """Whether ``path`` starts as something ``torch.load`` reads: a zip archive (torch.save since
    1.6), a protocol-2+ pickle (older torch.save) or a tar archive (torch 0.1). An image or a text
    file passed as a checkpoint is none of these: torch's weights-only refusal of its first byte
    ("Unsupported operand") is no sign of pickled objects worth trusting."""
    with open(path, "rb") as fh:
        head = fh.read(262)
    return head.startswith((b"PK\x03\x04", b"\x80")) or head[257:262] == b"ustar"


def torch_load_tensors(path: Path, mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)`` without torch's warning that a TorchScript archive is
    "dispatching to torch.jit.load": weights-only, it refuses the archive instead, and the
    caller names it (:data:`TORCHSCRIPT_REASON`); the warning said the opposite of what happened."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive", category=UserWarning)
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))


def load_state_dict(path: str | os.PathLike, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Load tensors without unpickling code: safetensors, or torch.load(weights_only=True).
    ``mmap``: a zip-format ``.pt``'s tensors are mapped, not read, so its names and shapes cost
    no read of its data (checking a sweep's checkpoints before anything runs)."""
    path = Path(path)
    if path.is_dir():
        raise HarnessError(f"{path}: is a folder, not a checkpoint file")
    if not path.is_file():
        raise HarnessError(f"{path}: checkpoint file does not exist")
    if is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise HarnessError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        obj = torch_load_tensors(path, mmap)
    except Exception as exc:
        reason = unreadable_reason(path, exc)
        if reason is not None:
            raise HarnessError(f"{path}: not a readable checkpoint: {reason}") from None
        raise HarnessError(
            f"{path}: refused to load: not a plain tensor checkpoint ({weights_only_reason(exc, path)}). "
            "Pickled modules (task_vectors layout) must be converted with "
            "`harness convert --trust-pickle` first"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise HarnessError(f"{path}: expected a dict of tensors, found a {type(obj).__name__}")
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:  # named, as the converter names it: an 'epoch' counter, a nested 'optimizer' state
        raise HarnessError(f"{path}: expected a dict of tensors, found {type(obj[bad]).__name__} under {bad!r}")
    return _without_ddp_prefix(obj)


def _without_ddp_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the ``module.`` a DistributedDataParallel model puts before every key
    (open_clip's training checkpoints of multi-GPU runs), stripped as open_clip's loader does."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def tensor_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a checkpoint's tensors; for safetensors from the header alone, for a
    zip-format ``.pt`` from its mapped tensors."""
    path = Path(path)
    if path.is_file() and is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                return {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
        except Exception as exc:
            raise HarnessError(f"{path}: not a readable safetensors file ({exc})") from None
    return {k: tuple(v.shape) for k, v in load_state_dict(path, mmap=True).items()}


#: safetensors' header dtypes by torch's names; another is lowercased (a float's then starts with "f" or "bf").
_HEADER_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "I32": "int32",
                  "U32": "uint32", "I64": "int64", "U64": "uint64", "F16": "float16", "BF16": "bfloat16",
                  "F32": "float32", "F64": "float64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def tensor_dtypes(path: str | os.PathLike) -> dict[str, str]:
    """Names and dtypes (torch's names, e.g. ``bfloat16``, ``int8``) of a checkpoint's tensors;
    for safetensors from the header alone, for a ``.pt`` from its mapped tensors."""
    path = Path(path)
    if path.is_file() and is_safetensors(path):
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                found = {k: fh.get_slice(k).get_dtype() for k in fh.keys()}
        except Exception as exc:
            raise HarnessError(f"{path}: not a readable safetensors file ({exc})") from None
        return {k: _HEADER_DTYPES.get(d, d.lower()) for k, d in found.items()}
    return state_dtypes(load_state_dict(path, mmap=True))


def state_dtypes(state: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Names and dtypes of ``state``'s tensors, named as :func:`tensor_dtypes` names a file's
    (``float16``, ``int8``: torch's names without ``torch.``)."""
    return {k: str(v.dtype).removeprefix("torch.") for k, v in state.items()}


def refuse_integer_weights(dtypes: Mapping[str, str], name: str | os.PathLike) -> None:
    """Refuse a model file ``name`` holding an integer (quantized?) tensor, naming the first one:
    an image encoder's weights are floats, and loading an integer tensor into one would cast it
    silently. ``dtypes``: :func:`tensor_dtypes` or :func:`state_dtypes`."""
    bad = next(((k, d) for k, d in dtypes.items() if not d.startswith(("f", "bf"))), None)
    if bad is not None:
        key, dtype = bad
        raise HarnessError(f"{name}: tensor {key!r} has dtype {dtype}, not floating point: an image encoder's "
                           "weights are floats (a quantized checkpoint? dequantize it first); it is not cast")


def check_encoder_shapes(path: str | os.PathLike, found: dict[str, tuple[int, ...]],
                         expected: dict[str, tuple[int, ...]], arch: str, name: str | None = None) -> None:
    """A fine-tuned checkpoint must hold exactly the pretrained image encoder's tensors.
    ``name``: how errors name the checkpoint (default: ``path``), e.g. with its sweep field."""
    name = name or str(path)
    for k, shape in expected.items():
        if k not in found:
            hf = next((f for f in found if f.endswith("patch_embedding.weight")), None)
            hint = (f"; it holds Hugging Face transformers tensors ({hf}): name the folder that holds it with its "
                    "config.json, which is converted" if hf is not None else "")
            raise HarnessError(f"{name}: tensor {k!r} of the pretrained image encoder is missing "
                               f"(keys do not match {arch}'s image encoder){hint}")
        if tuple(found[k]) != tuple(shape):
            raise HarnessError(f"{name}: tensor {k!r} has shape {tuple(found[k])}, pretrained has "
                               f"{tuple(shape)} (different architecture?)")
    extra = [k for k in found if k not in expected]
    if extra:
        raise HarnessError(f"{name}: unexpected tensor {extra[0]!r} (not an image encoder of {arch})")


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None,
                    digest: bool = False) -> None:
    """Atomic safetensors write (:func:`harness.cache.atomic_path`: a hidden temporary file,
    synced, then renamed), so a killed writer leaves no half file, and a failed one no temporary.
    ``digest`` records the file's sha256 (:func:`harness.cache.record_digest`) before the rename:
    a writer killed just after it leaves no new file under an older build's digest, which would
    read as damaged and be built again for nothing."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp),
                      metadata={k: str(v) for k, v in (metadata or {}).items()})
        except Exception as exc:
            code = re.search(r"\(os error (\d+)\)|\bcode: (\d+)", str(exc))  # safetensors' words: "... (os error 28)"
            if code:
                number = int(code.group(1) or code.group(2))
                raise OSError(number, os.strerror(number), str(path)) from exc
            raise
        os.chmod(tmp, 0o666 & ~current_umask())  # safetensors creates 0600: a shared cache's models would be the writer's alone
        if digest:
            record_digest(path, tmp)


@torch.no_grad()
def tensor_stamp(t: torch.Tensor) -> tuple:
    """What tells whether a tensor changed, without hashing it: its storage, in-place version
    counter, dtype, shape and the bytes of its sum. The counter sees in-place ops and
    ``load_state_dict``, the storage a replaced ``.data``, the sum writes through ``.data``
    that bypass the counter; one pass over the data, several times faster than sha256."""
    total = t.detach().sum().reshape(1).cpu()
    return t.data_ptr(), t._version, str(t.dtype), tuple(t.shape), bytes(total.view(torch.uint8).tolist())


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file, memoised next to nothing but (path, size, mtime) in-process."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


_DIGESTS: dict[tuple, str] = {}


WEIGHT_SUFFIXES = {".safetensors", ".pt", ".pth", ".bin"}
_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
_ARCH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def register_model_config(name: str, cfg: Any, origin: str | os.PathLike,
                          config_dir: Path | None = None) -> None:
    """Register the open_clip model config ``cfg`` under ``name`` in this process (a no-op when it is).

    ``origin`` (the file the config was read from) names the source in errors. With
    ``config_dir`` the config is also kept there as ``<name>.json`` (what ``harness import``
    leaves beside its output); else it is registered from a temporary file."""
    open_clip = open_clip_module()
    if not isinstance(name, str) or not _ARCH_NAME.fullmatch(name):
        raise HarnessError(f"{origin}: {name!r} is not a valid architecture name")
    if not isinstance(cfg, dict) or not all(k in cfg for k in _CONFIG_KEYS):
        raise HarnessError(f"{origin}: not an open_clip model config (needs {', '.join(_CONFIG_KEYS)})")
    have = open_clip.get_model_config(name)
    if have == cfg:
        return
    if have is not None:
        raise HarnessError(f"{origin}: open_clip architecture {name!r} already exists with another config")
    if config_dir is not None:
        config_dir.mkdir(parents=True, exist_ok=True)
        path = config_dir / f"{name}.json"
        if not path.is_file() or json_file(path) != cfg:
            atomic_write_bytes(path, (json.dumps(cfg, indent=2, sort_keys=True) + "\n").encode())
        open_clip.add_model_config(path)
        return
    with tempfile.TemporaryDirectory(prefix="harness-arch-") as tmp:  # open_clip registers files only
        path = Path(tmp) / f"{name}.json"
        path.write_text(json.dumps(cfg))
        open_clip.add_model_config(path)  # read now; the vanished path is skipped by later rescans


def json_file(path: Path) -> Any:
    """A JSON file's content; an unreadable one is a one-line error naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HarnessError(f"{path}: not readable JSON ({' '.join(str(exc).split())})") from None


def header_metadata(path: Path) -> dict[str, str]:
    """A safetensors file's header metadata ({} for other files): converted files record their arch there."""
    if not is_safetensors(path):
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise HarnessError(f"{path}: not a readable safetensors file ({exc})") from None


def whole_safetensors(path: Path) -> bool:
    """Whether ``path`` is a safetensors file whose header reads and covers the file: what a
    cache entry must be to be reused (one truncated or emptied since it was written is built again)."""
    if not (path.is_file() and is_safetensors(path)):
        return False
    try:
        header_metadata(path)
    except HarnessError:
        return False
    return True


def resolve_arch(arch: str, near: Sequence[str | os.PathLike] = ()) -> str:
    """Make the architecture ``arch`` buildable by open_clip in this process, or say why it is not.

    Known names (open_clip's, ``harness/model_configs``, ones registered earlier) pass as they
    are. Others are looked up beside each checkpoint file in ``near``, in what ``harness import``
    writes with a generated ``hf-vit-...`` architecture: the file's ``<file>.json`` sidecar
    (``arch`` + ``open_clip_config``), its safetensors header (same keys), and
    ``model_configs/<arch>.json`` in its folder. JSON only: nothing is unpickled."""
    open_clip = open_clip_module()
    if arch in open_clip.list_models():
        return arch
    looked: list[str] = []
    for item in near:
        path = Path(item)
        if not path.is_file():
            continue
        side = path.with_name(path.name + ".json")
        if side.is_file():
            info = json_file(side)
            recorded = info.get("arch") if isinstance(info, dict) else None
            if recorded == arch and info.get("open_clip_config") is not None:
                register_model_config(arch, info["open_clip_config"], f"{side} (open_clip_config)")
                return arch
            looked.append(f"{side} (its arch is {recorded!r})")
        meta = header_metadata(path)
        if meta.get("arch") == arch and meta.get("open_clip_config"):
            try:
                cfg = json.loads(meta["open_clip_config"])
            except ValueError:
                raise HarnessError(f"{path}: header metadata 'open_clip_config' is not JSON") from None
            register_model_config(arch, cfg, f"{path} (header metadata open_clip_config)")
            return arch
        config = path.parent / "model_configs" / f"{arch}.json"
        if config.is_file():
            register_model_config(arch, json_file(config), config)
            return arch
        looked.append(str(config))
    where = f"; not recorded in {', '.join(looked)}" if looked else ""
    hint = ""
    if arch.startswith("hf-vit-"):
        hint = ("; a generated architecture is recorded by `harness import` in each converted file's "
                ".json sidecar (arch, open_clip_config) and in model_configs/ beside it: keep those next "
                "to the model.pretrained file, or name the Hugging Face folder itself as model.pretrained")
    raise HarnessError(f"unknown open_clip architecture {arch!r}{did_you_mean(arch, open_clip.list_models())} "
                       f"(neither open_clip's nor harness/model_configs'){where}{hint}")


def buildable(arch: str, near: Sequence[str | os.PathLike] = ()) -> None:
    """Make ``arch`` buildable by open_clip in this process (:func:`resolve_arch`), with
    ``transformers`` given to its adapters when its text tower is a Hugging Face model."""
    resolve_arch(arch, near)
    if (open_clip_module().get_model_config(arch).get("text_cfg") or {}).get("hf_model_name"):
        enable_hf_text_towers()


def build_clip(arch: str, pretrained: str | None = None, cache_dir: str | None = None) -> nn.Module:
    """An open_clip CLIP by architecture name, with weights from a file or a cached tag."""
    open_clip = open_clip_module()
    from_file = bool(pretrained) and (Path(pretrained).suffix in WEIGHT_SUFFIXES or Path(pretrained).is_file())
    buildable(arch, [pretrained] if from_file else [])
    if from_file:
        model = _create_random(arch)
        state = load_state_dict(pretrained)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches: torch lists every tensor; name the first
            first = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), str(exc))
            raise HarnessError(f"{pretrained}: weights do not match architecture {arch!r}: {first}") from None
        if missing or unexpected:
            raise HarnessError(
                f"{pretrained}: weights do not match architecture {arch!r}: "
                f"missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}"
            )
    elif pretrained:
        try:
            with hub_offline(), _quiet_root_logger():  # open_clip logs a missing tag itself; the error says it once
                model = open_clip.create_model(arch, pretrained=pretrained, cache_dir=cache_dir)
        except Exception as exc:
            raise HarnessError(_uncached_tag(arch, pretrained, cache_dir, exc)) from None
    else:
        model = _create_random(arch)
    model.eval()
    return model


def _uncached_tag(arch: str, tag: str, cache_dir: str | None, exc: BaseException) -> str:
    where = cache_dir or "default open_clip/HF cache"
    return (f"pretrained weights {tag!r} for {arch!r} are not in the local cache ({where}): copy them there "
            f"or give a file path ({type(exc).__name__})")


def open_clip_tag_problem(arch: str, tag: str, cache_dir: str | None = None) -> str | None:
    """Why :func:`build_clip` could not load open_clip's weights ``tag`` for ``arch`` (not a tag
    of that architecture, or its file not in the local cache), or None: the lookup a run makes,
    offline, without reading the weights or building the model, so ``validate`` can tell."""
    open_clip_module()  # registers the harness's architectures first
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg, list_pretrained_tags_by_model

    cfg = get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = list_pretrained_tags_by_model(arch)
        known = f"{did_you_mean(tag, tags)} (its tags: {', '.join(tags)})" if tags else " (it has none)"
        return f"not an open_clip tag of architecture {arch!r}{known}, nor a weights file"
    try:
        with hub_offline(), _quiet_root_logger():
            target = download_pretrained(cfg, cache_dir=cache_dir)
        if not Path(target).is_file():  # a tag registered with a file path is returned unchecked
            raise FileNotFoundError(target)
    except Exception as exc:
        return _uncached_tag(arch, tag, cache_dir, exc)
    return None


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face Hub offline for the block, so a tag missing from the cache fails in seconds
    instead of retrying a hub with backoff (about a minute per tag). ``huggingface_hub`` reads
    ``HF_HUB_OFFLINE`` once, when imported (open_clip imports it), so its constant is set too."""
    import huggingface_hub.constants as hub

    old_env, old_flag = os.environ.get("HF_HUB_OFFLINE"), hub.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hub.HF_HUB_OFFLINE = "1", True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = old_flag
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def meta_clip_shapes(arch: str, near: Sequence[str | os.PathLike] = ()) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of open_clip's ``arch`` (its whole CLIP state dict), built on
    the meta device: no memory and no initialisation, so a ViT-L costs seconds, not gigabytes
    (``create_model(device="meta")`` alone builds the model in memory first, then moves it). A
    Hugging Face text tower is built from its config alone, with the hub offline: its weights
    are not needed, and a config missing from the local cache fails in seconds."""
    buildable(arch, near)
    with _quiet_root_logger(logging.ERROR), hub_offline(), torch.device("meta"):
        model = open_clip_module().create_model(arch, pretrained=None, device="meta", pretrained_text=False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _create_random(arch: str) -> nn.Module:
    """open_clip's model without weights (we load our own; its 'randomly initialized' warning is noise)."""
    with _quiet_root_logger(logging.ERROR):
        return open_clip_module().create_model(arch, pretrained=None)


@contextlib.contextmanager
def _quiet_root_logger(level: int = logging.CRITICAL) -> Iterator[None]:
    """Drop root-logger records below ``level`` for the block: open_clip logs through the root
    logger what the harness reports in its own words."""
    root = logging.getLogger()
    old = root.level
    root.setLevel(level)
    try:
        yield
    finally:
        root.setLevel(old)


def get_tokenizer(arch: str):
    return open_clip_module().get_tokenizer(arch)


@torch.no_grad()
def zeroshot_head(clip: nn.Module, tokenizer, prompts: Sequence[Sequence[str]], device: torch.device | str = "cpu",
                  advance: Callable[[int], None] | None = None) -> torch.Tensor:
    """The zero-shot head of the task-vectors protocol.

    For each class: encode every filled template, L2-normalise each, average, normalise
    again; stack the classes and scale by ``logit_scale.exp()``. Returns ``[classes, dim]``.
    ``advance(1)`` is called after each class (a progress bar: a ViT-B/32 text tower on a CPU takes
    minutes for SUN397's 794 prompts).
    """
    clip = clip.to(device).eval()
    rows = []
    for class_prompts in prompts:
        tokens = tokenizer(list(class_prompts)).to(device)
        emb = F.normalize(clip.encode_text(tokens).float(), dim=-1)
        rows.append(F.normalize(emb.mean(0), dim=-1))
        if advance is not None:
            advance(1)
    head = torch.stack(rows)
    return (head * clip.logit_scale.exp().float()).cpu()


class ImageClassifier(nn.Module):
    """Image encoder + frozen head: logits = normalize(encoder(x)) @ head.T (no bias).

    The head is applied in float32 even under autocast (``eval.precision``): the encoder's
    forward is what reduced precision speeds up; float32 logits keep the top-1 argmax free of
    the ties a bfloat16 product would round close classes into."""

    def __init__(self, encoder: nn.Module, head: torch.Tensor):
        super().__init__()
        self.encoder = encoder
        self.register_buffer("head", head.float(), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.encoder(images)
        with torch.autocast(features.device.type, enabled=False):
            feats = F.normalize(features.float(), dim=-1)
            return feats @ self.head.t()


def describe_state(state: dict[str, torch.Tensor]) -> str:
    """A short digest of a state dict, for identities when there is no file."""
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(json.dumps(list(v.shape)).encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")  # 0-dim: logit_scale
    return h.hexdigest()[:16]
