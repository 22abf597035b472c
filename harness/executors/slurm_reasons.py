"""Why SLURM ended or refused a job, in the sweep's words: the reason its state, exit code and
stderr give (out of memory, a failed setup line, a signal), and the ``executor`` field an
sbatch refusal is about."""

from __future__ import annotations

import re
import signal
from typing import Any


#: Why a job that left no result ended, by its SLURM state.
STATE_REASONS = {
    "OUT_OF_MEMORY": "out of memory",
    "TIMEOUT": "time limit reached",
    "CANCELLED": "cancelled",
    "NODE_FAIL": "node failure",
    "BOOT_FAIL": "node failed to boot",
    "DEADLINE": "deadline reached",
    "PREEMPTED": "preempted and not requeued",
    "FAILED": "the job process died",
    "COMPLETED": "the job ended without writing a result",
}

#: slurmstepd's words in a job's stderr when it killed the job for its memory: over-limit kill by
#: accounting (``JobAcctGatherParams=OverMemoryKill``), or the cgroup OOM killer.
MEMORY_KILL = re.compile(r"exceeded (?:job )?memory limit|oom[-_ ]kill event", re.IGNORECASE)

_MEMORY_NUMBERS = re.compile(r"exceeded memory limit \((\d+) > (\d+)\)")

#: What a failed setup line writes to the job's stderr log (the driver's reason quotes it).
SETUP_FAILED = re.compile(r"^harness: executor\.setup\.(\d+) failed \(exit (\d+)\): (.*)$", re.MULTILINE)


def state_reason(state: str) -> str:
    """Why a job SLURM left in ``state`` ended without a result, in words."""
    return STATE_REASONS.get(state, f"ended in state {state}")


def ended_reason(state: str, details: dict[str, str], stderr_tail: str, timeout_min: int) -> tuple[str, str]:
    """The state and the reason, in words, of a job that ended without a result.

    ``details`` are accounting's (``Signal``, ``ExitCode``). Without cgroups SLURM's memory kill
    leaves the job FAILED or CANCELLED, so slurmstepd's words in the stderr tail make it
    OUT_OF_MEMORY, as a cgroup OOM kill is recorded.
    """
    if state in ("FAILED", "CANCELLED") and MEMORY_KILL.search(stderr_tail):
        state = "OUT_OF_MEMORY"
    setup = SETUP_FAILED.search(stderr_tail)
    if state == "FAILED" and setup:
        line, code, text = setup.groups()
        return state, f"executor.setup.{line} failed (exit {code}): {text}"
    reason = state_reason(state)
    if state == "OUT_OF_MEMORY":
        numbers = _MEMORY_NUMBERS.search(stderr_tail)
        if numbers:
            used, limit = _gib_over_limit(*(int(x) for x in numbers.groups()))
            reason += f": used {used} GiB of its {limit} GiB"
        return state, reason + " (raise executor.mem_gb)"
    if state == "TIMEOUT":
        return state, (f"{reason} ({timeout_min} min) and not requeued: raise executor.timeout_min, "
                       "or have the method checkpoint in its workdir")
    sig = details.get("Signal")
    if sig:
        reason += f" (killed by signal {sig}{_signal_name(sig)})"
    elif state == "FAILED" and details.get("ExitCode"):
        reason += f" (exit code {details['ExitCode'].partition(':')[0]})"
    return state, reason


def _signal_name(sig: str) -> str:
    """``", SIGKILL"`` for a signal number that has a name here; ``""`` for one without (SLURM's
    ``0:53`` of a job that could not open its log, a real-time signal)."""
    try:
        return f", {signal.Signals(int(sig)).name}"
    except ValueError:
        return ""


def _gib_over_limit(used: int, limit: int) -> tuple[str, str]:
    """Bytes as GiB with two decimals, or as many more as it takes for a sample just over the
    limit (SLURM kills at the first sample past it) not to read as equal to the limit."""
    for decimals in range(2, 10):
        pair = f"{used / 2**30:.{decimals}f}", f"{limit / 2**30:.{decimals}f}"
        if pair[0] != pair[1] or used == limit:
            break
    return pair


def submitit_reason(text: str) -> str:
    """The reason a submitit job error gives, in one line of at most 500 characters: its last
    line that is neither a rule nor submitit's pointer to the log files."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not set(ln.strip()) <= {"-"}]
    useful = [ln for ln in lines if not ln.startswith(("You can check", "or at paths", "- /"))]
    return (useful or lines or [""])[-1][:500]


#: sbatch's words for a refused option, and the ``executor`` field that sets it ("gres": see
#: :func:`refused_field`; None: only ``sbatch:`` options set it). Checked in order: a refused
#: memory request also says "Requested node configuration is not available", which names no
#: option and is left to the fallback.
REFUSALS = (  # sbatch's words, the typed field they are about, and the ``sbatch:`` options setting the same
    (re.compile(r"invalid account", re.IGNORECASE), "account", ("account",)),
    (re.compile(r"invalid qos", re.IGNORECASE), "qos", ("qos",)),
    (re.compile(r"invalid partition", re.IGNORECASE), "partition", ("partition",)),
    (re.compile(r"invalid feature specification", re.IGNORECASE), "constraint", ("constraint",)),
    (re.compile(r"generic resource|\bgres\b", re.IGNORECASE), "gpus_per_node",
     ("gres", "gpus", "gpu", "cpus-per-gpu", "mem-per-gpu")),
    (re.compile(r"memory specification", re.IGNORECASE), "mem_gb", ("mem",)),
    (re.compile(r"time limit", re.IGNORECASE), "timeout_min", ("time",)),
    (re.compile(r"invalid node name", re.IGNORECASE), None, ("exclude", "nodelist", "nodefile")),  # only under sbatch:
)

#: sbatch's words when the controller cannot be reached (down, restarting, network): no option's fault.
CONTROLLER_DOWN = re.compile(r"unable to contact slurm controller|socket timed out on send/recv|"
                             r"slurm_persist_conn_open|connection refused", re.IGNORECASE)


def refused_field(e: Any, reason: str) -> tuple[str, Any]:
    """The ``executor`` field (dotted, under ``executor.``) sbatch's refusal ``reason`` is about,
    and its value; ``("executor", None)`` when the words name no option. An option given under
    ``sbatch:`` that sets the same thing (``mem-per-cpu`` for memory, ``time-min`` for the time
    limit, ``gres``, ``gpus-per-task`` or ``cpus-per-gpu`` for GPUs) is blamed before the typed
    field: it is the one the user wrote for this cluster. A refused generic resource with no GPUs
    asked for names no field, nor does a refused node name (``Invalid node name specified``)
    without an ``exclude``, ``nodelist`` or ``nodefile`` option under ``sbatch:`` (no typed field
    sets nodes). Words naming an ``sbatch:`` option itself (``unrecognized option '--mail-typ=END'``,
    ``Invalid --mail-type specification``) blame that option first, as do the controller's words
    naming one without its dashes (``Invalid time-min specification``, ``Job dependency problem``,
    ``Requested reservation is invalid``, ``Invalid license specification`` for ``licenses``).
    A key that starts the name of an option of a refusal is that option, as sbatch reads it
    (``exclud`` is ``--exclude``; one starting several names sbatch refuses, naming it as written)."""
    for key in e.sbatch:
        if re.search(rf"--{re.escape(key)}(?![\w-])", reason):
            return f"executor.sbatch.{key}", e.sbatch[key]
    for key in e.sbatch:
        word = re.escape(key[:-1]) + "s?" if key.endswith("s") else re.escape(key)
        if re.search(rf"(?<![\w-]){word}(?![\w-])", reason):  # case kept: no --batch in "Batch job"
            return f"executor.sbatch.{key}", e.sbatch[key]
    for pattern, name, options in REFUSALS:
        if not pattern.search(reason):
            continue
        for key in e.sbatch:  # long option names (checked by the config)
            if any(o.startswith(key) or key.startswith(o + "-") for o in options):
                return f"executor.sbatch.{key}", e.sbatch[key]
        if name is not None and (name != "gpus_per_node" or e.gpus_per_node):
            return f"executor.{name}", getattr(e, name)
    return "executor", None
