"""Byte budgets: parsing human sizes ("6GiB", "512MiB", "1.5GB", "123") and default budgets.

The default host budget is what the machine can give without swapping: ``MemAvailable`` (and
the cgroup's headroom inside a container) minus a safety margin for the rest of the process
(tokenizer, Python heap, the engine's own buffers) and for the other programs on the machine.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

KiB, MiB, GiB = 1024, 1024**2, 1024**3
_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": KiB,
    "mib": MiB,
    "gib": GiB,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")
MIN_HOST_MARGIN_BYTES = 2 * GiB
HOST_MARGIN_FRACTION = 0.10  # of total RAM, when that is more than MIN_HOST_MARGIN_BYTES


def parse_bytes(value: str | int, *, what: str = "size") -> int:
    """``"6GiB"`` -> 6442450944: the one byte-size parser of every flag, variable and option.

    A number (a fraction is fine: ``"1.5GB"``, ``".5k"``) and an optional unit, in any case,
    with space allowed around it. Units: none or ``B`` are bytes; ``k``/``kB``, ``M``/``MB``,
    ``G``/``GB``, ``T``/``TB`` are powers of 1000; ``KiB``, ``MiB``, ``GiB``, ``TiB`` powers of
    1024. A fractional byte count is truncated. An int is taken as bytes. Negative sizes and
    anything else raise ValueError naming ``what``."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a byte size, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what}: byte size must be >= 0, got {value}")
        return value
    match = _SIZE_RE.match(value)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"{what}: cannot parse {value!r} as a byte size (examples: 6GiB, 512MiB, 1.5GB, 1048576)"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: int | float) -> str:
    """1.50 GiB, 12.0 MiB, 512 B: for logs and tables."""
    for unit, size in (("TiB", 1024**4), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _meminfo() -> dict[str, int]:
    """``/proc/meminfo`` in bytes; empty where it does not exist (not Linux)."""
    out: dict[str, int] = {}
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            out[name] = int(fields[0]) * (KiB if fields[1:] == ["kB"] else 1)
    return out


def _cgroup_headroom() -> int | None:
    """Bytes the cgroup (v2) may still allocate, or None when it has no limit."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def available_host_bytes() -> int | None:
    """RAM this process can still take without swapping, or None when it cannot be known."""
    info = _meminfo()
    available = info.get("MemAvailable")
    headroom = _cgroup_headroom()
    if available is None:
        return headroom
    return available if headroom is None else min(available, headroom)


def default_host_budget_bytes() -> int:
    """Available RAM minus max(2 GiB, 10% of total RAM); 0 when that cannot be known."""
    available = available_host_bytes()
    if available is None:
        return 0
    total = _meminfo().get("MemTotal", 0)
    margin = max(MIN_HOST_MARGIN_BYTES, int(total * HOST_MARGIN_FRACTION))
    return max(0, available - margin)


def default_device_budget_bytes(device: torch.device, reserve_bytes: int) -> int:
    """Free device memory minus ``reserve_bytes`` (KV cache, activations, the trunk if not
    yet loaded). For a CPU device (tests, smoke runs) this is the host default."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return max(0, free - reserve_bytes)
    return max(0, default_host_budget_bytes() - reserve_bytes)
