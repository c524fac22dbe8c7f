"""What a Hugging Face Space changes, in one place: environment detection, storage checks, ZeroGPU durations.

Nothing here imports torch, gradio or ``spaces``; the ZeroGPU entry point itself lives in
``coe_core/experts/zero_gpu.py``. Sources (Hub docs read 2026-12): Spaces config reference
(https://huggingface.co/docs/hub/spaces-config-reference), disk usage on Spaces and storage buckets
(https://huggingface.co/docs/hub/spaces-storage, https://huggingface.co/docs/hub/storage-buckets), ZeroGPU
(https://huggingface.co/docs/hub/spaces-zerogpu).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from coe_core.errors import Unavailable

#: File systems whose locking SQLite cannot trust (the SQLite FAQ and "How To Corrupt An SQLite Database File"
#: name network file systems). Any FUSE mount is counted too: on a Space the only one is a storage bucket
#: (``hf-mount``, type ``fuse``), and a FUSE file system's locking is whatever its daemon implements.
NETWORK_FS_TYPES = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "9p",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "beegfs",
        "afs",
        "ocfs2",
        "virtiofs",
        "fuse",
        "fuseblk",
    }
)


def on_space(env: Mapping[str, str] | None = None) -> bool:
    """Running inside a Hugging Face Space (the runtime sets ``SYSTEM=spaces`` and ``SPACE_ID``)."""
    env = os.environ if env is None else env
    return env.get("SYSTEM") == "spaces" or bool(env.get("SPACE_ID"))


def on_zero_gpu(env: Mapping[str, str] | None = None) -> bool:
    """Running on ZeroGPU hardware (``SPACES_ZERO_GPU=true``, the variable the ``spaces`` package reads)."""
    env = os.environ if env is None else env
    return env.get("SPACES_ZERO_GPU", "").strip().lower() in ("1", "t", "true")


# -- storage -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str
    source: str

    @property
    def network(self) -> bool:
        return self.fstype in NETWORK_FS_TYPES or self.fstype.startswith("fuse.")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and len(field[i + 1 : i + 4]) == 3 and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """``/proc/self/mountinfo`` lines -> mounts (mount point, file system type, source)."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        mounts.append(Mount(_unescape(fields[4]), tail[0], _unescape(tail[1])))
    return mounts


def mount_of(path: str | Path, mountinfo: str | None = None) -> Mount | None:
    """The mount that holds ``path`` (which need not exist yet); None when the mount table cannot be read
    (not Linux)."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return None
    resolved = os.path.realpath(Path(path).expanduser())  # symlinks resolved as far as the path exists
    best: Mount | None = None
    for m in parse_mountinfo(mountinfo):
        point = m.point.rstrip("/") or "/"
        inside = resolved == point or resolved.startswith(point + "/") or point == "/"
        if inside and (best is None or len(point) >= len(best.point.rstrip("/") or "/")):
            best = m  # later lines of the same point are mounted over earlier ones
    return best


def space_notes(database_url: str, env: Mapping[str, str] | None = None) -> list[str]:
    """What to say at start on a Space: which one, ZeroGPU or not, and where the log lives."""
    env = os.environ if env is None else env
    if not on_space(env):
        return []
    notes = [
        f"on Hugging Face Space {env.get('SPACE_ID') or '(unnamed)'}"
        + (": ZeroGPU, a GPU slice is attached for each answer" if on_zero_gpu(env) else "")
    ]
    if database_url.startswith("sqlite") and not env.get("COE_HUB_EXPORT_REPO"):
        notes.append(
            "the log is SQLite on the Space's disk, which a restart wipes: set COE_HUB_EXPORT_REPO "
            "(a Hub dataset, scheduled JSONL export) or COE_DATABASE_URL (PostgreSQL) to keep it"
        )
    return notes


def storage_warnings(data_dir: str | Path, database_url: str, mountinfo: str | None = None) -> list[str]:
    """What to say at start about where the data directory and the log live (empty: nothing to worry about)."""
    mount = mount_of(data_dir, mountinfo)
    if mount is None or not mount.network:
        return []
    where = f"{mount.fstype} mount of {mount.source} at {mount.point}"
    if database_url.startswith("sqlite"):
        return [
            f"the data directory {data_dir} is on a network file system ({where}). SQLite's locking is not "
            "safe there (a storage bucket mounted as a volume is one): the log can be corrupted. Keep "
            "COE_DATA_DIR on the Space's local disk and keep the log with COE_DATABASE_URL (PostgreSQL) or "
            "COE_HUB_EXPORT_REPO (a scheduled JSONL export into a Hub dataset); see the README's Spaces section."
        ]
    return [
        f"the data directory {data_dir} is on a network file system ({where}): the log is in an external "
        "database, fine; the disk tier and router versions are read over the network (slower swaps)."
    ]


# -- ZeroGPU -------------------------------------------------------------------------------------------------
#: A conservative floor for decoding speed on a ZeroGPU slice (the hub profile's 0.5-1.7B experts in bf16 with
#: transformers' generate; one stream). Used only to size the GPU reservation, never to promise a speed.
ZERO_GPU_TOKENS_PER_S = 20.0
#: fork of the worker, CUDA initialisation and the expert's first copy to the GPU (a fresh worker pays it)
ZERO_GPU_OVERHEAD_S = 10.0
ZERO_GPU_MIN_S, ZERO_GPU_MAX_S = 15, 120


def zero_gpu_duration(max_new_tokens: int, prompt_tokens: int = 0) -> int:
    """Seconds to reserve a ZeroGPU slice for one answer of at most ``max_new_tokens``.

    A shorter reservation gets a visitor through the ZeroGPU queue sooner and spends less of their daily quota
    (ZeroGPU docs, "Duration Management"); a too-short one cuts the answer off. Prefill is counted as one token
    per 1000 prompt tokens' worth of decoding time, which is generous for a sub-2B model.
    """
    seconds = ZERO_GPU_OVERHEAD_S + max(int(max_new_tokens), 1) / ZERO_GPU_TOKENS_PER_S + prompt_tokens / 1000
    return int(min(max(seconds, ZERO_GPU_MIN_S), ZERO_GPU_MAX_S) + 0.999)


class GPUQuotaError(Unavailable):
    """ZeroGPU refused or lost the GPU for this turn (quota used up, duration too long, queue failure)."""


def gpu_error_message(title: str, message: str) -> str:
    """One clear sentence for a ZeroGPU refusal (``spaces`` raises ``gr.Error`` with these titles)."""
    title = (title or "").strip()
    message = " ".join((message or "").split())
    if "quota" in title.lower() or "quota" in message.lower():
        return (
            f"the GPU of this Space is not available to you right now: {message} The answer was not generated; "
            "try again later, log in to Hugging Face for more daily GPU time, or duplicate the Space."
        )
    if "duration" in title.lower():
        return (
            f"the GPU reservation for this answer was refused: {message} Ask for fewer new tokens "
            "(max new tokens) and try again."
        )
    return f"the GPU worker failed ({title or 'ZeroGPU'}): {message or 'no details'}. Try again."
