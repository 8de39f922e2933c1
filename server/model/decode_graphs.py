"""CUDA graphs of the decode step, one per batch-size bucket, captured once at start-up.

A step's launches (about a hundred kernels per layer in eager mode) become one graph replay.
This works because ``DecodeStep`` is a pure function of fixed-shape device tensors: the graph
reads its inputs from static buffers, which each step refills with one non-blocking copy from
pinned host memory (ids, positions, KV slots) and one device-side stack (slot tables). Slabs
and the KV cache never move, so paging experts in or out needs no recapture. The sampler runs
outside the graph, on the returned logits.

A batch of B rows runs the graph of the smallest bucket >= B; the pad rows repeat row 0 (same
token, position, KV slot and table), so their K/V writes are identical to row 0's and no
other sequence's cache is touched. Graphs attend over the whole KV length (one graph per
bucket); the cache positions past a row's own are masked.

CUDA only: on any other device the constructor refuses, and callers run ``DecodeStep`` eagerly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from server.model.decode_step import DecodeStep


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to ``max_batch`` (which is always the last bucket)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    buckets, b = [], 1
    while b < max_batch:
        buckets.append(b)
        b *= 2
    return [*buckets, max_batch]


class GraphedDecode:
    def __init__(self, step: DecodeStep, max_batch: int, *, compile_step: bool = False) -> None:
        """Capture one graph per bucket of ``batch_buckets(max_batch)``. ``compile_step``: run
        the step through torch.compile (inductor, fullgraph) before capturing it, which fuses
        its pointwise ops (start-up takes longer)."""
        device = step.model.device
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"CUDA graphs need a CUDA device, the model is on {device}")
        self.step, self.device = step, device
        self.buckets = batch_buckets(max_batch)
        largest = self.buckets[-1]
        self.host = torch.zeros(largest, 3, dtype=torch.int64).pin_memory()  # ids, positions, KV slots
        # warm-up and capture run on token 0 at the last cache position of KV slot 0, which no
        # live sequence reads again (a row writes a position before it attends to it, and none
        # decodes past the last), and on slot 0 of every slab (zero tables)
        self.host[:, 1] = step.kv.max_len - 1
        self.inputs = self.host.to(device)
        shape = (largest, step.num_layers, step.max_experts)
        self.tables = torch.zeros(shape, dtype=torch.int32, device=device)
        run: Callable[..., torch.Tensor] = step
        if compile_step:
            run = torch.compile(step, fullgraph=True, dynamic=False)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        with torch.inference_mode():
            side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up off the capture stream (lazy init, autotuning)
                for b in self.buckets:
                    for _ in range(2):
                        run(*self._args(b))
            torch.cuda.current_stream(device).wait_stream(side)
            pool = None
            for b in reversed(self.buckets):  # largest first: the smaller graphs reuse its memory
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[b] = run(*self._args(b))
                pool = graph.pool()
                self.graphs[b] = graph
        torch.cuda.synchronize(device)

    def _args(self, b: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
        inputs = self.inputs[:b]
        return inputs[:, 0], inputs[:, 1], inputs[:, 2], self.tables[:b], self.step.kv.max_len

    def bucket(self, batch: int) -> int:
        for b in self.buckets:
            if b >= batch:
                return b
        raise ValueError(f"batch of {batch} rows is larger than the largest bucket {self.buckets[-1]}")

    def run(self, token_ids: list[int], positions: list[int], kv_slots: list[int],
            slot_tables: torch.Tensor) -> torch.Tensor:
        """One step: float32 logits [B, V] (a copy; the graph's output buffer is reused).
        slot_tables: int32 [B, L, E_max] on the device.

        The pinned input buffer is rewritten each step; the previous step's copy out of it has
        finished by then, because the caller read that step's sampled tokens on the host."""
        B = len(token_ids)
        b = self.bucket(B)
        self.step.check(B, slot_tables)
        if max(positions) >= self.step.kv.max_len:
            raise ValueError(f"position {max(positions)} is past the KV cache length {self.step.kv.max_len}")
        host = self.host.numpy()
        host[:B, 0], host[:B, 1], host[:B, 2] = token_ids, positions, kv_slots
        host[B:b] = host[0]
        self.inputs[:b].copy_(self.host[:b], non_blocking=True)
        self.tables[:B].copy_(slot_tables)
        if b > B:
            self.tables[B:b].copy_(slot_tables[:1].expand(b - B, -1, -1))
        self.graphs[b].replay()
        return self.outputs[b][:B].clone()
