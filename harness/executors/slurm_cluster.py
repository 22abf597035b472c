"""What the SLURM cluster says: job states (squeue, then sacct), exit details, whether the
controller answers, the largest job array, the partitions' limits. Each command has a timeout;
one that fails or does not answer reads as no answer, never as a state."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterable


#: The state of a job accounting has no record of while the controller does not answer: not lost.
NO_ANSWER = "NO_ANSWER"

#: Seconds a SLURM command may take before it counts as not answering.
COMMAND_TIMEOUT_S = 60.0


def _run(cmd: list[str]) -> str | None:
    """A SLURM command's output; None when it did not answer (not found, timed out, failed), which
    says nothing of any job. Asked about one job id it no longer holds, SLURM exits 1 with
    'Invalid job id specified': that is an answer, and an empty one."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode == 0:
        return r.stdout
    return "" if "Invalid job id specified" in r.stderr else None


def listed_files(paths: Iterable[Path]) -> set[str] | None:
    """The files now in the folders holding ``paths``, as path strings: one directory listing
    per folder, where a stat per job (milliseconds each on a shared filesystem) made every poll
    of a large sweep cost as many file-system calls as it had jobs. None when a folder there is
    cannot be listed (no read permission, a stale NFS handle): each file is looked at instead,
    as an empty listing would read a finished job's result as missing."""
    found: set[str] = set()
    for folder in {p.parent for p in paths}:
        try:
            with os.scandir(folder) as entries:
                found.update(os.path.join(folder, e.name) for e in entries)
        except (FileNotFoundError, NotADirectoryError):  # no folder yet: nothing in it
            continue
        except OSError:
            return None
    return found


def exists(path: Path, listed: set[str] | None) -> bool:
    """Whether ``path`` exists: in ``listed`` (see :func:`listed_files`), or by asking the filesystem."""
    return str(path) in listed if listed is not None else path.exists()


def _sacct_records(job_ids: list[str], fields: str = "JobID,State") -> dict[str, list[str]]:
    """Accounting records by job id ('A' or array task 'A_i'). A record of never-started array
    tasks names a range ('A_[2-7%8]') that may still include tasks that started since: records
    of single tasks win over ranges."""
    bases = sorted({i.split("_")[0] for i in job_ids})
    if not bases:
        return {}
    out = _run(["sacct", "-X", "-n", "-P", "-o", fields, "-j", ",".join(bases)]) or ""
    ranged: dict[str, list[str]] = {}
    single: dict[str, list[str]] = {}
    for line in out.splitlines():
        jid, *rest = line.split("|")
        if "[" in jid:
            base, _, spec = jid.partition("_[")
            for part in spec.rstrip("]").split("%")[0].split(","):
                lo, _, hi = part.partition("-")
                if lo.isdigit():
                    for i in range(int(lo), int(hi or lo) + 1):
                        ranged[f"{base}_{i}"] = rest
        elif jid:
            single[jid] = rest
    return {**ranged, **single}


def slurm_states(job_ids: list[str], reasons: dict[str, str] | None = None) -> dict[str, str]:
    """The current SLURM state of each job: the controller's (squeue) while it holds the job,
    else accounting's (sacct, asked only about jobs the controller does not list: it is the
    heavier query, which cluster admins ask drivers not to make every poll); "UNKNOWN" when
    neither knows it, NO_ANSWER when accounting does not and the controller does not answer.
    ``reasons`` gets, per job the controller holds, why it is pending (``PartitionTimeLimit``,
    ``Resources``), if it says."""
    ids = sorted(set(job_ids))
    states: dict[str, str] = {}
    bases = sorted({i.split("_")[0] for i in ids})
    queue = _run(["squeue", "-h", "-r", "-o", "%i|%T|%r", "-j", ",".join(bases)]) if bases else ""
    if queue:
        for line in queue.splitlines():
            jid, _, rest = line.partition("|")
            state, _, reason = rest.partition("|")
            if jid and state:
                states[jid] = state.strip().upper()
                if reasons is not None and reason.strip() not in ("", "None"):
                    reasons[jid] = reason.strip()
    for jid, rec in _sacct_records([i for i in ids if i not in states]).items():
        if rec and rec[0]:
            states.setdefault(jid, rec[0].split()[0].upper())
    # squeue failing is no evidence a job is gone, however long it lasts and whatever ``scontrol ping`` says
    answered = queue is not None and (set(ids) <= set(states) or controller_answers())
    unknown = "UNKNOWN" if answered else NO_ANSWER
    return {i: states.get(i, unknown) for i in ids}


def controller_answers() -> bool:
    """Whether SLURM's controller answers (``scontrol ping``): while it does not (down,
    restarting, unreachable), squeue's silence about a job says nothing of it."""
    return " is UP" in (_run(["scontrol", "ping"]) or "")


def max_array_size() -> int:
    """SLURM's ``MaxArraySize``: an array's task indices must stay below it (``scontrol show
    config``; SLURM's default, 1001, when it does not answer)."""
    for line in (_run(["scontrol", "show", "config"]) or "").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "MaxArraySize" and value.strip().isdigit():
            return max(1, int(value.strip()))
    return 1001


def sacct_details(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """State, exit code and killing signal of finished jobs from accounting, by job id: two sacct
    calls however many jobs (asked one by one, a sweep whose jobs all failed made two per job)."""
    ids = sorted(set(job_ids))
    details: dict[str, dict[str, str]] = {}
    for jid, rec in _sacct_records(ids, "JobID,State,ExitCode").items():
        if jid in ids and len(rec) >= 2:
            details[jid] = {"State": rec[0].split()[0].upper() if rec[0] else "UNKNOWN", "ExitCode": rec[1]}
    if not details:
        return details
    out = _run(["sacct", "-n", "-P", "-o", "JobID,ExitCode", "-j", ",".join(sorted(details))]) or ""  # their steps too
    for line in out.splitlines():
        jid, _, code = line.partition("|")
        job, dot, _ = jid.partition(".")
        sig = code.partition(":")[2]
        if dot and job in details and sig not in ("", "0"):
            details[job].setdefault("Signal", sig)  # the job's process (a step) was killed by this signal
    return details


def partition_limit_min(text: str) -> float:
    """sinfo's time limit (``infinite``, ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``)
    in minutes; infinite when SLURM sets none."""
    text = text.strip()
    if text in ("infinite", "n/a", "UNLIMITED", ""):
        return float("inf")
    days, _, clock = text.rpartition("-")
    parts = [int(x) for x in clock.split(":")]
    if days:  # D-H, D-H:M, D-H:M:S
        h, m, sec = (parts + [0, 0])[:3]
    elif len(parts) == 3:
        h, m, sec = parts
    elif len(parts) == 2:
        h, m, sec = 0, *parts
    else:
        h, m, sec = 0, parts[0], 0
    return int(days or 0) * 1440 + h * 60 + m + sec / 60


def cluster_partitions() -> dict[str, dict[str, Any]] | None:
    """Per partition (``sinfo``): its time limit in minutes, the most CPUs and memory (MB) of one
    of its nodes, and whether it is the default; None when ``sinfo`` is missing or fails."""
    if shutil.which("sinfo") is None:
        return None
    try:
        r = subprocess.run(["sinfo", "-a", "-h", "-o", "%P|%l|%c|%m"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    parts: dict[str, dict[str, Any]] = {}
    for line in r.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 4 or not fields[0]:
            continue
        name, limit, cpus, mem = fields
        default = name.endswith("*")
        p = parts.setdefault(name.rstrip("*"), {"limit_min": 0.0, "cpus": 0, "mem_mb": 0, "default": default})
        with contextlib.suppress(ValueError):
            p["limit_min"] = max(p["limit_min"], partition_limit_min(limit))
        with contextlib.suppress(ValueError):
            p["cpus"] = max(p["cpus"], int(cpus.rstrip("+")))
        with contextlib.suppress(ValueError):
            p["mem_mb"] = max(p["mem_mb"], int(mem.rstrip("+")))
    return parts or None
