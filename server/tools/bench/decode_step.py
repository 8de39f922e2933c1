"""What one decode step costs and whether it compiles whole: the ``decode_step`` report.

Measured on a batch-1 pool row (its pool pinned at prefill, slot table from the pins), through
``MoETransformer.decode`` with the table: the path the engine serves such rows on.

- ``ops_per_layer``: on CPU, aten ops dispatched per decode token (a TorchDispatchMode counter
  under inference_mode, where a composite op such as linear or einsum counts once), divided by
  the number of layers; on CUDA, device kernels per token from the profiler (the graph's kernels
  when CUDA graphs are captured), divided by the number of layers.
- ``fullgraph``: the step ran under ``torch.compile(fullgraph=True)`` and its logits matched the
  eager ones. CPU compiles with the aot_eager backend (whole-graph capture and functionalisation;
  inductor's C++ build takes minutes on a small CPU), CUDA with inductor.
- ``host_syncs_per_token``: CUDA only, from ``torch.cuda.set_sync_debug_mode``; None on CPU.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from server.model.kv_cache import KVCache
from server.model.loader import LoadedModel, load_model

PROMPT_TOKENS = 24
COUNTED_TOKENS = 4


@dataclass(frozen=True)
class DecodeStepReport:
    device: str
    fullgraph: bool | None  # None: not checked
    ops_per_layer: float
    host_syncs_per_token: float | None
    counted_on: str
    fullgraph_note: str = ""

    def line(self) -> str:
        syncs = "-" if self.host_syncs_per_token is None else f"{self.host_syncs_per_token:g}"
        graph = {True: "yes", False: "NO", None: "not checked"}[self.fullgraph]
        note = f" ({self.fullgraph_note})" if self.fullgraph_note else ""
        return (f"| {self.device} | {graph}{note} | {self.ops_per_layer:.1f} | {syncs} | {self.counted_on} |")


MARKDOWN_HEADER = ["| decode step on | fullgraph | ops / layer / token | host syncs / token | counted on |",
                   "|---|---|---:|---:|---|"]


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class PoolRow:
    """One prefilled pool row ready to decode: inputs of ``model.decode`` for its next tokens."""

    def __init__(self, loaded: LoadedModel, pool: int | None, prompt_tokens: int = PROMPT_TOKENS,
                 extra: int = 64, *, kv: KVCache | None = None, slot: int = 0, seed: int = 0) -> None:
        """A prompt of ``prompt_tokens`` ids (varied by ``seed``) prefilled into KV slot ``slot``
        of ``kv`` (default: a cache of its own with room for ``extra`` decoded tokens)."""
        self.model, config = loaded.model, loaded.config
        self.kv = kv or KVCache(config, 1, prompt_tokens + extra, self.model.device, self.model.dtype)
        self.slot = slot
        ids = torch.arange(prompt_tokens, device=self.model.device) * (seed + 1) + 7 * seed
        ids = ids % config.vocab_size
        out = self.model.prefill(ids, self.kv, slot, pool_size=pool, pin_pool=pool is not None)
        self.pinned, self.pools = out.pinned, out.pools
        table = self.model.resident_table()
        if pool is not None:
            table = self.model.slot_table_row(out.pools, dict(zip(out.pinned, out.pinned_slots, strict=True)))
        if table is None:
            raise ValueError("full routing has a slot table only on a resident expert store")
        self.table = table
        self.position = prompt_tokens
        self.token = int(out.logits[-1].argmax())

    def inputs(self) -> tuple[torch.Tensor, torch.Tensor, KVCache, torch.Tensor, None, torch.Tensor]:
        """``model.decode``'s arguments for the row's next token (host tensors, as the engine)."""
        return (torch.tensor([self.token]), torch.tensor([self.position]), self.kv, torch.tensor([self.slot]),
                None, self.table[None])

    def step(self, counter: OpCounter | None = None) -> torch.Tensor:
        """Decode the next token (greedy); ``counter`` counts the model's ops alone."""
        args = self.inputs()
        if counter is None:
            logits = self.model.decode(*args)
        else:
            with counter:
                logits = self.model.decode(*args)
        self.position += 1
        self.token = int(logits[0].argmax())
        return logits

    def release(self) -> None:
        if self.pinned:
            self.model.expert_store.release(self.pinned)
            self.pinned = []


def count_cpu_ops(row: PoolRow) -> float:
    """Dispatched aten ops per layer per token on the path that serves the row."""
    row.step()  # first call builds the step's tables
    counter = OpCounter()
    for _ in range(COUNTED_TOKENS):
        row.step(counter)
    return float(counter.total) / COUNTED_TOKENS / row.model.config.num_layers


def count_cuda_kernels(row: PoolRow) -> float:
    from torch.profiler import ProfilerActivity, profile

    row.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(COUNTED_TOKENS):
            row.step()
        torch.cuda.synchronize()
    kernels = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
    return kernels / COUNTED_TOKENS / row.model.config.num_layers


def count_host_syncs(row: PoolRow) -> float:
    """Synchronising CUDA calls per decode token (the sampled token's read is not counted:
    it happens after the step, in the sampler)."""
    row.step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(COUNTED_TOKENS):
                row.model.decode(*row.inputs())
                row.position += 1
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return len(caught) / COUNTED_TOKENS


def check_fullgraph(row: PoolRow) -> tuple[bool, str]:
    """Compile the batch-1 step with fullgraph=True; True when it runs and matches eager."""
    model, kv = row.model, row.kv
    step = model.decode_step(kv)
    device = model.device
    args = (torch.tensor([row.token], device=device), torch.tensor([row.position], device=device),
            torch.tensor([row.slot], device=device), row.table[None])
    attend_len = kv.max_len
    backend = "inductor" if device.type == "cuda" else "aot_eager"
    torch._dynamo.reset()
    with torch.inference_mode():
        eager = step(*args, attend_len)
        try:
            compiled = torch.compile(step, fullgraph=True, backend=backend)(*args, attend_len)
        except Exception as e:  # noqa: BLE001 - a graph break or a compile failure is the finding
            return False, f"{backend}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    tolerance = 1e-4 if model.dtype == torch.float32 else 5e-2
    scale = float(eager.abs().max())
    diff = float((compiled - eager).abs().max())
    if diff > tolerance * max(1.0, scale):
        return False, f"{backend}: max |diff| {diff:.3g} vs eager"
    return True, backend


def measure_decode_step(model_dir: Path, device: str, dtype: str, pool: int | None,
                        fullgraph: bool = True) -> DecodeStepReport:
    dev = torch.device(device)
    loaded = load_model(model_dir, device=dev, dtype=dtype)
    row = PoolRow(loaded, pool)
    where = f"batch-1 {'pool ' + str(pool) if pool is not None else 'full-routing'} row"
    try:
        if dev.type == "cuda":
            loaded.model.capture_decode_graphs(row.kv, 1)
            ops = count_cuda_kernels(row)
            syncs: float | None = count_host_syncs(row)
            counted = f"{where}, CUDA graph replay, kernels from the profiler"
        else:
            ops, syncs = count_cpu_ops(row), None
            counted = f"{where}, eager step, dispatched aten ops"
        graph, note = check_fullgraph(row) if fullgraph else (None, "")
    finally:
        row.release()
    return DecodeStepReport(str(dev), graph, ops, syncs, counted, note)
