"""What a sweep asks of SLURM: submitit's parameters from the ``executor`` block, and the checks
of them against the cluster (partitions' limits, GPUs asked for) before anything is submitted."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import submitit

from harness.config import SweepConfig
from harness.executors.slurm_cluster import cluster_partitions


def signal_delay_s(timeout_min: int) -> int:
    """Seconds before the time limit at which SLURM sends USR2 (submitit then checkpoints)."""
    return min(90, timeout_min * 15)


def job_settings(cfg: SweepConfig) -> dict[str, Any]:
    """The executor fields a submitted job keeps (its resources, limits, setup, sbatch options)."""
    return cfg.executor.model_dump(mode="json", exclude={"kind", "workers", "poll_s", "array_parallelism"})


def submitit_executor(cfg: SweepConfig, folder: Path, kind: str = "slurm") -> Any:
    """submitit's executor for the sweep: its parameters, and how often a job may be requeued at
    its time limit (a constructor argument, not a parameter)."""
    ex = submitit.AutoExecutor(folder=folder, cluster=kind, slurm_max_num_timeout=cfg.executor.requeues)
    ex.update_parameters(**submitit_parameters(cfg))
    return ex


def setup_script(lines: list[str]) -> list[str]:
    """The batch script's lines for ``executor.setup``: each line, shell-quoted, is ``eval``ed in the
    job's shell (so ``export``, ``source`` and ``module load`` last) and one that fails ends the job
    saying which, rather than the job running without the environment it asked for."""
    return [f"eval {shlex.quote(line)} || {{ echo \"harness: executor.setup.{i} failed (exit $?):\" "
            f"{shlex.quote(line)} >&2; exit 1; }}" for i, line in enumerate(lines)]


def submitit_parameters(cfg: SweepConfig) -> dict[str, Any]:
    """AutoExecutor parameters from ``executor:``; setup lines go as a list, never as one shell string."""
    e = cfg.executor
    params: dict[str, Any] = {
        "name": f"harness-{cfg.name}",
        "timeout_min": e.timeout_min,
        "cpus_per_task": e.cpus_per_task,
        "slurm_array_parallelism": e.array_parallelism,
        # SLURM signals USR2 this long before the time limit: submitit then checkpoints and requeues
        "slurm_signal_delay_s": signal_delay_s(e.timeout_min),
        # the job step gets the batch shell's environment (what setup lines set, submitit's own
        # variable) even under ``sbatch --export=NONE``, which srun would otherwise inherit
        "slurm_srun_args": ["--export=ALL"],
    }
    if e.gpus_per_node:
        params["gpus_per_node"] = e.gpus_per_node
    if e.mem_gb is not None:
        params["mem_gb"] = e.mem_gb
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(e, key)
        if value is not None:
            params[f"slurm_{key}"] = sbatch_value(value)
    if e.setup:
        params["slurm_setup"] = setup_script(e.setup)
    if e.sbatch:  # each one '#SBATCH --key=value' line, the value shell-quoted by submitit
        params["slurm_additional_parameters"] = {k: sbatch_value(v) for k, v in e.sbatch.items()}
    return params


def sbatch_value(value: Any) -> Any:
    """A value for an ``#SBATCH`` line, which submitit shell-quotes: sbatch undoes the quotes but
    reads a backslash as an escape even inside single quotes (``'a\\b'`` gives ``ab``), so each
    backslash is doubled to reach the job as written."""
    return value.replace("\\", "\\\\") if isinstance(value, str) else value


#: ``sbatch:`` options that ask for GPUs (a key may be the start of one's name, as sbatch reads it).
GPU_OPTIONS = ("gres", "gpus", "gpus-per-task", "gpus-per-socket", "tres-per-task")


def asks_for_gpus(e: Any) -> bool:
    """Whether the ``executor`` block asks SLURM for GPUs: ``gpus_per_node``, or a GPU option under
    ``sbatch:`` (a ``gres`` or ``tres-per-task`` one only if it names a GPU: ``tmpdisk:100`` or
    ``cpu:4`` asks for none)."""
    return bool(e.gpus_per_node) or any(_asks_for_gpus(key, value) for key, value in e.sbatch.items())


def _asks_for_gpus(key: str, value: Any) -> bool:
    """Whether sbatch option ``key`` (or the start of one, as sbatch reads it) set to ``value`` asks for GPUs."""
    option = next((o for o in GPU_OPTIONS if o.startswith(key)), key if key.startswith("gpus-per-") else None)
    if option is None:
        return False
    return option not in ("gres", "tres-per-task") or "gpu" in str(value).lower()


def gpu_request_warning(cfg: SweepConfig) -> str | None:
    """Why a SLURM sweep on ``device: cuda`` that asks for no GPU is likely wrong, or None: a
    cluster that accounts GPUs places its jobs on nodes (or shares of them) without one, where
    they fail. Not refused: some clusters give a node's GPUs unasked."""
    e = cfg.executor
    if e.kind != "slurm" or not cfg.device.startswith("cuda") or asks_for_gpus(e):
        return None
    return (f"the jobs run on device {cfg.device} but ask SLURM for no GPU (gpus_per_node {e.gpus_per_node}, no "
            "GPU gres, tres-per-task or gpus option under executor.sbatch): where the cluster allocates GPUs they "
            "land without one and fail; set executor.gpus_per_node: 1, or pass a GPU option (executor.sbatch: "
            "{gres: 'gpu:1'} or {gpus: 1})")


def check_cluster(cfg: SweepConfig, file: str, partitions: dict[str, dict[str, Any]] | None = None) -> None:
    """The executor's partition exists and its time limit, CPUs and memory fit the partition,
    where ``sinfo`` answers: SLURM accepts a job over a partition's time limit or CPU count and
    leaves it pending forever (PartitionTimeLimit, PartitionConfig), so the sweep would wait
    on jobs that never start. Off a cluster (no ``sinfo``) nothing is checked."""
    from harness.config_errors import ConfigError

    e = cfg.executor
    if e.kind != "slurm":
        return
    parts = cluster_partitions() if partitions is None else partitions
    if not parts:
        return
    if e.partition is None:
        names = [n for n, p in parts.items() if p["default"]][:1]
        if not names:
            return
    else:
        names = e.partition.split(",")
        for name in names:
            if name not in parts:
                raise ConfigError(file, "executor.partition", f"the cluster has no partition {name!r}; "
                                  f"it has {', '.join(sorted(parts))}", e.partition)
    chosen = [parts[n] for n in names]
    where = f"partition {', '.join(names)}" + (" (the cluster's default)" if e.partition is None else "")
    limit = max(p["limit_min"] for p in chosen)
    if e.timeout_min > limit:
        raise ConfigError(file, "executor.timeout_min", f"over the time limit of {where}, {limit:g} min "
                          "(SLURM would keep the jobs pending)", e.timeout_min)
    cpus = max(p["cpus"] for p in chosen)
    if cpus and e.cpus_per_task > cpus:
        raise ConfigError(file, "executor.cpus_per_task", f"more CPUs than a node of {where} has ({cpus}) "
                          "(SLURM would keep the jobs pending)", e.cpus_per_task)
    mem_mb = max(p["mem_mb"] for p in chosen)
    if mem_mb and e.mem_gb is not None and e.mem_gb * 1024 > mem_mb:
        raise ConfigError(file, "executor.mem_gb", f"more memory than a node of {where} has ({mem_mb / 1024:.1f} GB)",
                          e.mem_gb)
