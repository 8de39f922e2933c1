"""Paging benchmark: experts loaded by the cache from the host tier and from disk, next to the
machine's own pinned host->device bandwidth and file sequential-read bandwidth, measured in the
same run.

Disk passes start cold: each file is fsync'ed and its page cache dropped with
``posix_fadvise(DONTNEED)`` (no root needed). Where that is impossible, the sequential-read
reference reads experts the cache passes never touch, and the report says so.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from expert_cache.base import ExpertCatalog, ExpertKey
from expert_cache.cache import TieredExpertCache
from expert_cache.catalog import per_expert_catalog
from expert_cache.host_tier import host_bytes_for
from expert_cache.memory import format_bytes
from expert_cache.safetensors_index import SafetensorsIndex, read_bytes_into

READ_BLOCK = 16 * 1024 * 1024


@dataclass(frozen=True)
class CacheBenchConfig:
    model_dir: Path
    experts: int = 512
    device: str = "cuda"
    device_slots: int = 64
    drop_page_cache: bool = True

    def __post_init__(self) -> None:
        if self.experts < 1:
            raise ValueError(f"experts must be >= 1, got {self.experts}")
        if self.device_slots < 1:
            raise ValueError(f"device_slots must be >= 1, got {self.device_slots}")


@dataclass
class BenchRow:
    name: str
    nbytes: int
    seconds: float
    reference: str = ""

    @property
    def gb_per_s(self) -> float:
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


@dataclass
class CacheBenchResult:
    header: str
    rows: list[BenchRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        lines = [self.header, f"{'path':<34}{'bytes':>12}{'seconds':>10}{'GB/s':>9}   reference"]
        for r in self.rows:
            size = format_bytes(r.nbytes)
            lines.append(f"{r.name:<34}{size:>12}{r.seconds:>10.3f}{r.gb_per_s:>9.2f}   {r.reference}")
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def drop_page_cache(paths: list[Path]) -> bool:
    """Write back and drop the cached pages of ``paths``; False where the OS cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def copy_bandwidth(device: torch.device, chunk_bytes: int, chunks: int, pinned: bool) -> BenchRow:
    """Host -> device copies of ``chunks`` expert-sized chunks, after one warm-up round."""
    src = torch.empty(chunk_bytes * chunks, dtype=torch.uint8, pin_memory=pinned)
    src.fill_(1)
    dst = torch.empty(chunk_bytes * chunks, dtype=torch.uint8, device=device)
    seconds = 0.0
    for _round in range(2):  # the first round warms up the copy engines / page tables
        _sync(device)
        t0 = time.perf_counter()
        for i in range(chunks):
            piece = slice(i * chunk_bytes, (i + 1) * chunk_bytes)
            dst[piece].copy_(src[piece], non_blocking=pinned)
        _sync(device)
        seconds = time.perf_counter() - t0
    kind = ("pinned" if pinned else "pageable") if device.type == "cuda" else "memcpy"
    return BenchRow(f"reference: {kind} host->{device.type}", chunk_bytes * chunks, seconds)


def sequential_read(ranges: list[tuple[Path, int, int]]) -> BenchRow:
    """Read byte ranges ``(path, start, end)`` in order, in 16 MiB blocks, into one buffer."""
    buf = torch.empty(READ_BLOCK, dtype=torch.uint8)
    total = 0
    t0 = time.perf_counter()
    for path, start, end in ranges:
        for off in range(start, end, READ_BLOCK):
            n = min(READ_BLOCK, end - off)
            read_bytes_into(path, off, buf[:n])
            total += n
    return BenchRow("reference: file sequential read", total, time.perf_counter() - t0)


def _byte_ranges(catalog: ExpertCatalog, keys: list[ExpertKey]) -> list[tuple[Path, int, int]]:
    """Per file, the span from the first to the last byte of ``keys``' tensors."""
    spans: dict[Path, tuple[int, int]] = {}
    for key in keys:
        for chunks in catalog.chunks[key].values():
            for c in chunks:
                lo, hi = spans.get(Path(c.path), (c.offset, c.offset + c.nbytes))
                spans[Path(c.path)] = (min(lo, c.offset), max(hi, c.offset + c.nbytes))
    return [(p, lo, hi) for p, (lo, hi) in sorted(spans.items())]


def _subset(catalog: ExpertCatalog, keys: list[ExpertKey]) -> ExpertCatalog:
    layers = {k[0] for k in keys}
    return ExpertCatalog(
        parts={layer: catalog.parts[layer] for layer in layers},
        chunks={k: catalog.chunks[k] for k in keys},
        dtype=catalog.dtype,
    )


def _prepare(cache: TieredExpertCache, layer: int, drop: list[Path]) -> None:
    """Take all memory before timing (pin the host tier, touch the slab's pages on CPU), then
    drop the files' page cache so that the timed pass reads from disk."""
    cache.allocate_host_tier()
    for slab in cache.slab(layer).values():
        slab.zero_()
    _sync(cache.device)
    drop_page_cache(drop)


def _page_through(cache: TieredExpertCache, keys: list[ExpertKey]) -> float:
    """Acquire every key once, as many at a time as the slab holds; seconds until all landed."""
    _sync(cache.device)
    t0 = time.perf_counter()
    i = 0
    while i < len(keys):
        batch = keys[i : i + cache.capacity(keys[i][0])]  # one slab group: equal expert sizes
        cache.acquire(batch)
        cache.release(batch)
        i += len(batch)
    _sync(cache.device)
    return time.perf_counter() - t0


def run_cache_bench(cfg: CacheBenchConfig, log: Callable[[str], None] = print) -> CacheBenchResult:
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda requested but CUDA is not available (use --device cpu for a smoke run)")
    full = per_expert_catalog(SafetensorsIndex.from_directory(cfg.model_dir))
    all_keys = full.keys()
    if cfg.experts > len(all_keys):
        raise ValueError(f"--experts {cfg.experts}: the checkpoint has only {len(all_keys)} experts")
    keys = all_keys[: cfg.experts]
    catalog = _subset(full, keys)
    eb = catalog.expert_bytes(keys[0][0])
    if any(catalog.expert_bytes(layer) != eb for layer in catalog.parts):
        raise ValueError("benchmark needs experts of one size; pick --experts within equal layers")
    slots = min(cfg.device_slots, max(1, len(keys) // 2))  # fewer slots than experts: every pass misses
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU slab"
    result = CacheBenchResult(
        f"emo-serve bench cache: {len(keys)} experts of {cfg.model_dir} ({format_bytes(eb)} each, "
        f"{catalog.dtype}), device {device} ({name}), {slots} device slots"
    )
    files = sorted({p for p, _, _ in _byte_ranges(catalog, keys)})
    dropped = cfg.drop_page_cache and drop_page_cache(files)
    log("measuring host->device copy bandwidth")
    ref_pinned = copy_bandwidth(device, eb, min(64, len(keys)), pinned=device.type == "cuda")
    refs = [ref_pinned]
    if device.type == "cuda":
        refs.append(copy_bandwidth(device, eb, min(64, len(keys)), pinned=False))
    log("measuring file sequential read")
    if dropped:
        ref_disk = sequential_read(_byte_ranges(catalog, keys))
        result.notes.append("page cache dropped with fsync + posix_fadvise(DONTNEED) before each disk pass")
    else:
        unread = all_keys[cfg.experts : 2 * cfg.experts]
        ref_disk = sequential_read(_byte_ranges(full, unread or keys))
        result.notes.append(
            "page cache NOT dropped: disk passes may be served from RAM; the sequential-read reference "
            "read experts the cache passes do not"
            + ("" if unread else " (none left: it read the same ones, possibly from cache)")
        )
    refs.append(ref_disk)
    disk_bytes = sum(c.nbytes for k in keys for cs in catalog.chunks[k].values() for c in cs)
    ref_h2d = f"{ref_pinned.name.removeprefix('reference: ')} {ref_pinned.gb_per_s:.2f} GB/s"
    ref_read = f"file sequential read {ref_disk.gb_per_s:.2f} GB/s"
    log("paging from disk (no host tier)")
    with TieredExpertCache(
        catalog, device=device, device_budget_bytes=slots * eb, host_budget_bytes=0
    ) as cache:
        _prepare(cache, keys[0][0], files if dropped else [])
        seconds = _page_through(cache, keys)
    result.rows.append(BenchRow("disk -> device (host tier 0)", disk_bytes, seconds, ref_read))
    log("paging through the host tier")
    budget = host_bytes_for(eb, len(keys), pinned=device.type == "cuda")
    with TieredExpertCache(
        catalog, device=device, device_budget_bytes=slots * eb, host_budget_bytes=budget
    ) as cache:
        _prepare(cache, keys[0][0], files if dropped else [])
        seconds = _page_through(cache, keys)
        result.rows.append(BenchRow("disk -> host tier -> device", disk_bytes, seconds, ref_read))
        log("paging from the host tier")
        seconds = _page_through(cache, keys)
        s = cache.stats()
        if s.host.hits < len(keys):
            result.notes.append(f"host tier held only {s.host.resident} of {len(keys)} experts")
        result.rows.insert(0, BenchRow("host tier -> device", len(keys) * eb, seconds, ref_h2d))
    result.rows.extend(refs)
    return result
