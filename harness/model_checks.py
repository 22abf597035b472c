"""Checks of the model block's files before anything is built: each pretrained, fine-tuned and
head file exists, reads, and holds tensors of the architecture the sweep names."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from harness.config import SweepConfig
from harness.config_errors import ConfigError, Gathering, gathered
from harness.errors import HarnessError
from harness.path_checks import relative_note


def check_model_files(cfg: SweepConfig, file: str) -> None:
    """Every local model file a ``files`` sweep names exists. Checked where the sweep file is
    known (the CLI, ``validate`` and ``--dry-run`` included), so the error names file and field;
    the workspace checks the same paths again for library use."""
    m = cfg.model
    if m.source != "files":
        return
    from harness.models import resolve_arch, unknown_arch_problem

    found = Gathering()  # every missing file, a line each (a pattern's too: it names the task)
    pre = m.pretrained
    if pre and written_as_path(pre) and not Path(pre).exists():
        found.errors.append(ConfigError(file, "model.pretrained", f"weights file does not exist{relative_note(pre)}",
                                        pre))
    problem = unknown_arch_problem(m.arch)
    if problem and pre and Path(pre).is_file():  # an architecture recorded beside the weights, as the run reads it
        try:
            resolve_arch(m.arch, [pre])
            problem = None
        except HarnessError:
            problem += f"; nor recorded beside {Path(pre).name} (model_configs/{m.arch}.json, its .json sidecar)"
    if problem:
        found.errors.append(ConfigError(file, "model.arch", problem, m.arch))
    for t in cfg.task_names:  # required for merged tasks; optional for unseen ones
        required = t in cfg.merge_tasks or t in m.finetuned
        where, path = finetuned_field(cfg, t)
        if path is None:
            if required:
                found.errors.append(ConfigError(file, "model.finetuned", f"no checkpoint for task {t!r}",
                                                show_value=False))
            continue
        if required and not Path(path).exists():
            whose = f"checkpoint of task {t!r}" if where == "model.finetuned_pattern" else "checkpoint"
            found.errors.append(ConfigError(file, where, f"{whose} does not exist{relative_note(path)}", path))
    for t, path in m.heads.items():
        if t not in cfg.task_names:  # kept for another selection of tasks (tasks=... on the command line)
            continue
        if not Path(path).exists():
            found.errors.append(ConfigError(file, f"model.heads.{t}", f"head file does not exist{relative_note(path)}",
                                            path))
        elif Path(path).is_dir():
            found.errors.append(ConfigError(file, f"model.heads.{t}", "is a folder, not a head file", path))
    found.raise_any()


def written_as_path(pretrained: str) -> bool:
    """Whether ``model.pretrained`` is written as a file's path (a folder in it, a suffix), not
    as an open_clip tag: a missing one is a missing file, not an unknown tag."""
    return "/" in pretrained or bool(Path(pretrained).suffix)


def check_pretrained_tag(cfg: SweepConfig, file: str) -> None:
    """Weights named by an open_clip tag are a tag of ``model.arch`` and in the local cache: the
    run's offline lookup (no weights read, no model built), so a tag of another architecture or
    one never downloaded is named before the sweep starts. An unknown architecture is
    :func:`check_model_files`' error."""
    from harness.models import open_clip_tag_problem, unknown_arch_problem

    m = cfg.model
    pre = m.pretrained
    if m.source != "files" or not pre or written_as_path(pre) or Path(pre).exists():
        return
    if unknown_arch_problem(m.arch) is None:
        problem = open_clip_tag_problem(m.arch, pre, str(cfg.resolved_cache_dir() / "open_clip"))
        if problem:
            raise ConfigError(file, "model.pretrained", problem, pre)


def check_model_contents(cfg: SweepConfig, file: str) -> None:
    """What each model file of a ``files`` sweep holds, read as the run reads it but with nothing
    unpickled, converted or built (safetensors headers, a ``.pt``'s mapped tensors): a pickled
    module (the task_vectors layout), a file that is no checkpoint, a damaged one, a folder that
    is not a Hugging Face CLIP folder, pretrained weights without a text tower. Each is named
    with its field here, by ``validate`` and ``--dry-run`` too, instead of by the sweep once it
    starts loading models. Tensor shapes are :func:`check_checkpoint_shapes`' part."""
    m = cfg.model
    if m.source != "files":
        return
    from harness.checkpoints import whole_clip_problem
    from harness.hf_convert import hf_folder_of
    from harness.models import tensor_shapes

    named = pretrained_file(cfg) + finetuned_files(cfg)
    named += [(f"model.heads.{t}", path, path) for t, path in m.heads.items() if t in cfg.task_names]
    found = Gathering()  # every file's, a line each
    for where, path, whose in named:
        p = Path(path)
        if hf_folder_of(p) is not None or (p.is_dir() and (p / "config.json").is_file()):
            continue  # a Hugging Face folder: its converter reads it (and names what is wrong)
        if p.is_dir():
            found.errors.append(ConfigError(file, where, f"{whose}: a folder that is not a Hugging Face CLIP folder "
                                            "(no config.json); name a checkpoint file", show_value=False))
            continue
        try:
            tensor_shapes(p)
            problem = whole_clip_problem(p) if where == "model.pretrained" else None
        except HarnessError as exc:
            problem = str(exc).removeprefix(f"{p}: ")
            if where == "model.pretrained" and problem.startswith("refused to load"):  # converting is not all it needs
                problem += (" (and serve as the pretrained model only if they hold a whole CLIP, whose text tower "
                            "builds the zero-shot heads: a task_vectors zeroshot.pt holds the image encoder alone; "
                            "give open_clip's weights, a tag such as openai, or a Hugging Face CLIPModel folder)")
        if problem:
            found.errors.append(ConfigError(file, where, f"{whose}: {problem}", show_value=False))
    found.raise_any()


def pretrained_file(cfg: SweepConfig) -> list[tuple[str, str, str]]:
    """The pretrained weights' file where the config names one that exists, as
    :func:`finetuned_files` gives the checkpoints'."""
    m = cfg.model
    return [("model.pretrained", m.pretrained, m.pretrained)] if m.pretrained and Path(m.pretrained).exists() else []


def finetuned_files(cfg: SweepConfig) -> list[tuple[str, str, str]]:
    """Each task's fine-tuned checkpoint the config names and that exists: its field, its path
    and how a message names it (by its task too where a pattern gave it)."""
    named = []
    for t in cfg.task_names:
        where, path = finetuned_field(cfg, t)
        if path is not None and Path(path).exists():
            named.append((where, path, f"checkpoint of task {t!r} ({path})" if where == "model.finetuned_pattern" else path))
    return named


def finetuned_field(cfg: SweepConfig, task: str) -> tuple[str, str | None]:
    """The field that names ``task``'s fine-tuned checkpoint, and the path it gives (None: none)."""
    m = cfg.model
    if task in m.finetuned:
        return f"model.finetuned.{task}", m.finetuned[task]
    return "model.finetuned_pattern", m.finetuned_pattern.format(task=task) if m.finetuned_pattern else None


def encoder_shapes(shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]] | None:
    """The image encoder's tensor shapes among a file's: all of them in the harness's layout, the
    ones under its single prefix (``visual.`` of a whole CLIP, ``model.visual.``) stripped of it;
    None when there is no one encoder (the run names what is wrong)."""
    if "class_embedding" in shapes:
        return shapes
    prefixes = {k[: -len("class_embedding")] for k in shapes if k.endswith(".class_embedding")}
    if len(prefixes) != 1:
        return None
    (prefix,) = prefixes
    return {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}


def first_shape_mismatch(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> str | None:
    """The first tensor (in ``expected``'s order) both hold with different shapes, else None."""
    return next((k for k, shape in expected.items() if k in found and tuple(found[k]) != tuple(shape)), None)


def _read_as_is(path: Path) -> bool:
    """Whether the run reads ``path``'s tensors under their own names (a safetensors or ``.pt``
    file), so their shapes are checked before any job: not a Hugging Face folder or its weights
    file, which the converter renames."""
    from harness.hf_convert import hf_folder_of

    return path.is_file() and hf_folder_of(path) is None


def check_checkpoint_shapes(cfg: SweepConfig, file: str) -> None:
    """Every fine-tuned checkpoint's tensors have the pretrained image encoder's shapes, read from
    safetensors headers or a ``.pt``'s mapped tensors (nothing unpickled, no tensor's data read,
    whatever the checkpoints' size), so a checkpoint of another architecture or width is named
    with its field before any job runs; so is one missing a tensor, holding one more, or holding
    integer (quantized) tensors, as the run's preflight refuses them. When every fine-tuned
    checkpoint (two or more) differs in shape from the pretrained weights in the same way, the
    pretrained weights are the odd ones out. Hugging Face folders and weights named by an
    open_clip tag are checked by the run's preflight, against the built model."""
    from harness.models import check_encoder_shapes, refuse_integer_weights, tensor_dtypes, tensor_shapes

    m = cfg.model
    pre = Path(m.pretrained) if m.source == "files" and m.pretrained else None
    if pre is None or not _read_as_is(pre):
        return
    try:
        expected = encoder_shapes(tensor_shapes(pre))
    except HarnessError:
        return  # the run names the unreadable file
    if not expected:
        return
    checked, mismatches, faults = 0, [], []
    for where, path, whose in finetuned_files(cfg):
        if not _read_as_is(Path(path)):
            continue
        try:
            held = tensor_shapes(path)
        except HarnessError:
            continue  # check_model_contents names the unreadable file
        found = encoder_shapes(held)
        if found is None and not any(k.endswith("class_embedding") for k in held):
            found = held  # no encoder under a prefix: read as the run reads it, in the harness's layout
        if found is None:
            continue  # several image encoders: the run says what it holds
        checked += 1
        k = first_shape_mismatch(expected, found)
        if k is not None:
            mismatches.append((where, whose, k, tuple(found[k])))
            continue
        try:  # what the run's preflight refuses too, told here from the same header
            check_encoder_shapes(path, found, expected, m.arch, whose)
            refuse_integer_weights(encoder_shapes(tensor_dtypes(path)) or {}, whose)
        except HarnessError as exc:
            faults.append(ConfigError(file, where, str(exc), show_value=False))
    if mismatches:
        where, whose, k, shape = mismatches[0]
        if checked > 1 and len(mismatches) == checked and all((x[2], x[3]) == (k, shape) for x in mismatches):
            raise ConfigError(file, "model.pretrained", f"{pre}: tensor {k!r} of its image encoder has shape "
                              f"{tuple(expected[k])}, every fine-tuned checkpoint has {shape} (weights of another "
                              "architecture or width?)", show_value=False)
        faults = [ConfigError(file, where, f"{whose}: tensor {k!r} has shape {shape}, pretrained has "
                              f"{tuple(expected[k])} (model.pretrained {pre.name}: another architecture or width?)",
                              show_value=False) for where, whose, k, shape in mismatches] + faults
    if faults:
        raise gathered(faults)


def check_pretrained_arch(cfg: SweepConfig, file: str) -> None:
    """The pretrained weights fit ``model.arch``: a whole-CLIP file's tensor names and shapes (a
    safetensors header, a ``.pt``'s mapped tensors) against open_clip's model of that name built
    on the meta device (no memory, no weights), as the run loads it (every tensor, strictly). A
    ViT-B-16 named for ViT-B-32 weights is one line naming ``model.arch`` here, not a failure
    once the sweep builds the model. Hugging Face folders, an encoder without its ``visual.``
    tower and weights named by an open_clip tag are checked when loaded. Weights that were built
    with ``model.arch`` already (the encoder summary a driver reads instead of building the
    model) fit it: open_clip is not imported for them."""
    from harness.models import meta_clip_shapes, tensor_shapes

    m = cfg.model
    pre = Path(m.pretrained) if m.source == "files" and m.pretrained else None
    if pre is None or not _read_as_is(pre):
        return
    try:
        found = tensor_shapes(pre)
    except HarnessError:
        return  # check_model_contents names the unreadable file
    if not any(k.startswith("visual.") for k in found):
        return
    from harness.workspace import cached_encoder_summary, encoder_summary_file, file_identity

    if cached_encoder_summary(encoder_summary_file(cfg.resolved_cache_dir(), m.arch, file_identity(str(pre)))):
        return  # built with these weights before (the summary a driver reads): open_clip stays unimported
    try:
        built = meta_clip_shapes(m.arch, [str(pre)])
    except Exception:  # noqa: BLE001  (an unknown name is check_model_files' error; anything else, the run's)
        return
    where = f"model.pretrained {pre.name}"
    built = dict(sorted(built.items(), key=lambda kv: not kv[0].startswith("visual.")))  # the image tower named first
    k = first_shape_mismatch(built, found)
    if k is not None:
        raise ConfigError(file, "model.arch", f"architecture {m.arch!r} has tensor {k!r} of shape {built[k]}, "
                          f"{where} has {tuple(found[k])} (weights of another architecture or width?)", m.arch)
    missing, unexpected = [k for k in built if k not in found], [k for k in found if k not in built]
    if missing or unexpected:
        parts = ([f"{len(missing)} of its tensors are not in {where} (first {missing[0]!r})"] if missing else []) + (
            [f"{where} has {len(unexpected)} it lacks (first {unexpected[0]!r})"] if unexpected else [])
        raise ConfigError(file, "model.arch", f"architecture {m.arch!r} does not fit the pretrained weights: "
                          f"{'; '.join(parts)} (weights of another architecture or depth?)", m.arch)


def check_folder_arch(cfg: SweepConfig, file: str) -> None:
    """Each Hugging Face folder a ``files`` sweep names converts under ``model.arch`` as the run
    converts it (:func:`harness.hf_convert.check_given_arch`), its sizes read from its config.json
    and its tensors' shapes alone, nothing loaded: a folder of another size or activation is one
    line here, not a failure once the sweep converts it. The pretrained folder's mismatch is
    ``model.arch``'s, a fine-tuned folder's its own field's, as is what else converting a folder
    refuses (a projection of another width, tensors the config does not describe)."""
    m = cfg.model
    if m.source != "files":
        return
    from harness.hf_convert import check_given_arch, folder_open_clip_config, hf_folder_of

    pre = pretrained_file(cfg)
    found = Gathering()  # every folder's, a line each
    arch_blamed = False  # the pretrained folder does not fit model.arch: the others' misfit says no more
    generated = None  # the pretrained folder's config, where model.arch is the name import generates for it
    for where, path, whose in pre + finetuned_files(cfg):
        folder = hf_folder_of(path)
        if folder is None:
            continue
        pretrained = where == "model.pretrained"
        kind = "clip" if pretrained else "image_encoder"
        projection = None if pretrained or not pre else pre[0][1]  # a vision-only folder takes the pretrained one's
        read = False  # a refusal once the folder is read is the architecture's
        try:
            oc_cfg = folder_open_clip_config(folder, kind, projection)
            read = True
            if check_given_arch(m.arch, oc_cfg, kind, folder, projection, generated) and pretrained:
                generated = oc_cfg  # registered once the run converts it: fine-tuned folders are checked against it
        except HarnessError as exc:
            if pretrained and read:
                found.errors.append(ConfigError(file, "model.arch", str(exc), m.arch))
                arch_blamed = True
            elif not (arch_blamed and read):
                found.errors.append(ConfigError(file, where, f"{whose}: {str(exc).removeprefix(f'{folder}: ')}",
                                                show_value=False))
    found.raise_any()


def check_recorded_arch(cfg: SweepConfig, file: str) -> None:
    """Each converted checkpoint was converted for an architecture that computes as ``model.arch``
    does. GELU and QuickGELU towers (or towers with another head count) hold the same tensors, so
    the shape checks pass and every score would silently come from another activation. The
    architecture is the one ``harness import`` / ``harness convert`` recorded (sidecar, header)."""
    m = cfg.model
    if m.source != "files":
        return
    from harness.convert import recorded_arch

    want: _Tower | None = None
    found = Gathering()  # every file's, a line each
    for where, path in [("model.pretrained", m.pretrained)] + [finetuned_field(cfg, t) for t in cfg.task_names]:
        if not path or not Path(path).is_file():
            continue
        try:
            got = recorded_arch(Path(path))
        except HarnessError:
            continue  # check_model_contents names the unreadable file
        if got is None or got == m.arch:
            continue
        want = want or _image_tower(m.arch, [m.pretrained] if m.pretrained else [])
        have = _image_tower(got, [path])
        if want is None or have is None or have == want:
            continue
        if have.size != want.size:  # other tensors, not the same ones computing differently
            found.errors.append(ConfigError(
                file, where, f"{path} was converted for architecture {got!r} (image tower {have.size_text()}), but "
                f"model.arch {m.arch!r} is {want.size_text()}: a checkpoint of another architecture; set model.arch: "
                f"{got}, or give checkpoints of {m.arch}", show_value=False))
        else:
            found.errors.append(ConfigError(
                file, where, f"{path} was converted for architecture {got!r} ({have.computation_text()}), but "
                f"model.arch {m.arch!r} is {want.computation_text()}: the same tensors compute differently; set "
                f"model.arch: {got}, or convert the source again with --arch {m.arch}", show_value=False))
    found.raise_any()


def check_model_reading(cfg: SweepConfig, file: str) -> None:
    """What the model files hold (contents, tensor shapes, architecture), every file's fault a
    line, told together. Pretrained weights already found at fault (unreadable, without a text
    tower, the odd ones out of every checkpoint) are not then compared with ``model.arch``: that
    line would blame the architecture for the weights' own fault."""
    found = Gathering()
    for check in (check_model_contents, check_checkpoint_shapes, check_pretrained_arch, check_folder_arch,
                  check_recorded_arch):
        if check is check_pretrained_arch and any(line.path == "model.pretrained" for error in found.errors
                                                  for line in (error, *error.further)):
            continue
        with found.check():
            check(cfg, file)
    found.raise_any()


class _Tower(NamedTuple):
    """An architecture's image tower as :func:`check_recorded_arch` compares two: its size, which
    its tensors' shapes show, and its activation and head count, which they do not."""

    quick_gelu: bool
    heads: int | None
    size: tuple[int | None, int | None, int | None]  # width, layers, patch size

    def size_text(self) -> str:
        width, layers, patch = self.size
        return f"width {width}, {layers} layers, patch {patch}"

    def computation_text(self) -> str:
        return f"{'QuickGELU' if self.quick_gelu else 'GELU'}, {self.heads} attention heads"


def _image_tower(arch: str, near: list[str]) -> _Tower | None:
    """``arch``'s image tower; None when the architecture is not known here."""
    from harness.models import open_clip_module, resolve_arch

    try:
        resolve_arch(arch, near)
    except HarnessError:
        return None
    config = open_clip_module().get_model_config(arch) or {}
    vision = config.get("vision_cfg") or {}
    width, head_width = vision.get("width"), vision.get("head_width", 64)
    return _Tower(bool(config.get("quick_gelu", False)), (width // head_width if width and head_width else None),
                  (width, vision.get("layers"), vision.get("patch_size")))
