"""Continuous batching: which prefill to advance next, or a batched decode of the running.

A request is admitted (WAITING -> PREFILLING, KV slot taken) and then prefilled over several
steps: each ``Prefill`` step advances one prefilling request by a bounded amount of work (the
engine core decides how much), and a request whose next layer's experts are being paged in by a
loader thread is LOADING and is skipped until they are resident. When its prefill is complete
the core calls ``prefilled`` and it joins the running batch. A ``Prefill`` step is never
chosen twice in a row while sequences are running, so running streams get a decode step
between any two pieces of prefill work, whatever is being loaded.

With ``separate_full_rows`` (a device tier that cannot hold every expert), full-routing rows
decode in steps of their own: they find their misses inside the step and may wait for reads
there, and the pool rows (whose experts are pinned and resident) must not wait with them.

Admission of a request needs a free KV slot, ``len(running) + len(prefilling) < max_num_seqs``
and, by the expert store (see pool_budget.py): pool requests need their ``P x layers`` slots
free, after the slots that requests still prefilling will pin for their remaining layers
(experts in flight count: they are pinned, or reserved, already); full routing ones a small
reserve. Among the first ``lookahead`` admissible waiting requests the one whose predicted pool
is most resident goes first (FIFO on ties; full-routing requests and requests without a
prediction score the mean residency of all experts). A request that has waited more than
``max_wait_steps`` scheduler steps is served strictly first: while it is not admissible nobody
else is admitted, so running work drains until it fits (bounded wait).
"""

from __future__ import annotations

from dataclasses import dataclass

from server.engine.config import EngineConfig
from server.engine.kv_slots import KVSlotAllocator
from server.engine.pool_budget import PoolBudget
from server.engine.sequence import SeqStatus, Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    """Built by the Engine from its EngineConfig (max_num_seqs: the KV slots it could allocate);
    the defaults are EngineConfig's, so a scheduler tested alone behaves as the engine's does."""

    max_num_seqs: int = EngineConfig.max_num_seqs
    max_wait_steps: int = EngineConfig.max_wait_steps
    lookahead: int = 8
    separate_full_rows: bool = False

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_wait_steps", "lookahead"):
            if getattr(self, name) < 1:
                raise ValueError(f"SchedulerConfig.{name}: must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Prefill:
    seq: Sequence


@dataclass(frozen=True)
class Decode:
    seqs: list[Sequence]


Step = Prefill | Decode


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVSlotAllocator, budget: PoolBudget) -> None:
        self.config = config
        self.kv = kv
        self.budget = budget
        self.waiting: list[Sequence] = []  # arrival order (requeued prefills go back to the front)
        self.prefilling: list[Sequence] = []  # admitted, prefill in progress (LOADING ones included)
        self.running: list[Sequence] = []
        self._last_was_prefill = False
        self._last_decoded_full = False
        # set when a pool prefill hit SlotsExhausted: no pool admission until pins are released
        self._pool_blocked = False

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        """Admitted requests (KV slot held): decoding or prefilling."""
        return len(self.running) + len(self.prefilling)

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    @property
    def num_loading(self) -> int:
        return sum(1 for s in self.prefilling if s.status is SeqStatus.LOADING)

    def schedule(self) -> Step | None:
        """The next step, or None when there is nothing that can run now (everything admitted
        is loading, or nothing is admitted)."""
        for seq in self.waiting:
            seq.waited_steps += 1
        if not (self.running and self._last_was_prefill):
            ready = (s for s in self.prefilling if s.status is SeqStatus.PREFILLING)
            nxt = self._admit() or next(ready, None)
            if nxt is not None:
                self._last_was_prefill = True
                return Prefill(nxt)
        self._last_was_prefill = False
        if self.running:
            return Decode(self._decode_rows())
        return None

    def _admit(self) -> Sequence | None:
        if not self.waiting:
            return None
        picked = self._pick()
        if picked is None:
            return None
        slot = self.kv.allocate()
        assert slot is not None  # _pick checked kv.num_free
        self.waiting.remove(picked)
        picked.slot, picked.status = slot, SeqStatus.PREFILLING
        self.prefilling.append(picked)
        return picked

    def _decode_rows(self) -> list[Sequence]:
        if not self.config.separate_full_rows:
            return list(self.running)
        pool_rows = [s for s in self.running if s.is_pool]
        full_rows = [s for s in self.running if not s.is_pool]
        if pool_rows and full_rows:  # alternate
            self._last_decoded_full = not self._last_decoded_full
            return full_rows if self._last_decoded_full else pool_rows
        return pool_rows or full_rows

    def prefilled(self, seq: Sequence) -> None:
        """``seq``'s prefill is complete: it joins the running batch."""
        self.prefilling.remove(seq)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    def _pick(self) -> Sequence | None:
        if len(self.running) + len(self.prefilling) >= self.config.max_num_seqs or self.kv.num_free == 0:
            return None
        head = self.waiting[0]
        if head.waited_steps > self.config.max_wait_steps:
            return head if self.admissible(head) else None
        best: Sequence | None = None
        best_score, prior = -1.0, None
        for seq in self.waiting[: self.config.lookahead]:
            if not self.admissible(seq):
                continue
            if seq.predicted_keys:
                score = self.budget.residency(seq.predicted_keys)
            else:  # no prediction: what a random pool would find resident
                prior = self.budget.mean_residency() if prior is None else prior
                score = prior
            if score > best_score:  # strict: FIFO among equals
                best, best_score = seq, score
        return best

    def admissible(self, seq: Sequence) -> bool:
        if seq.pool_size is None:
            return self.budget.can_admit_full()
        if self._pool_blocked:
            return False
        admitted = self.running + self.prefilling
        full_running = any(s.pool_size is None for s in admitted)
        pinned = frozenset(k for s in admitted for k in s.pinned)
        reserved = [0] * len(self.budget.groups)
        for s in self.prefilling:  # the layers they have not pinned yet will take slots
            if s.pool_size is not None:
                done = {k[0] for k in s.pinned}
                for i, g in enumerate(self.budget.groups):
                    reserved[i] += s.pool_size * sum(1 for layer in g.layers if layer not in done)
        return self.budget.can_admit_pool(seq.pool_size, full_running, seq.predicted_keys, pinned, reserved)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (finished, aborted or failed) and free its KV slot. The caller
        releases its expert pins."""
        if seq in self.running or seq in self.prefilling:
            (self.running if seq in self.running else self.prefilling).remove(seq)
            self._pool_blocked = False  # pins may have been released: try pools again
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.slot is not None:
            self.kv.free(seq.slot)
            seq.slot = None
        seq.status = SeqStatus.FINISHED

    def requeue(self, seq: Sequence, *, block_pools: bool) -> None:
        """Undo the admission of a sequence whose prefill backed off (nothing was kept): it goes
        back to the front of the queue. ``block_pools``: pause pool admission until a running
        sequence finishes (its pins are what the prefill lacked). The caller has released the
        sequence's pins and dropped its prefill state."""
        (self.running if seq in self.running else self.prefilling).remove(seq)
        if seq.slot is not None:
            self.kv.free(seq.slot)
            seq.slot = None
        seq.status = SeqStatus.WAITING
        self.waiting.insert(0, seq)
        self._pool_blocked = self._pool_blocked or block_pools
