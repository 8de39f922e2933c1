"""Continuous batching: which request to prefill next, or a batched decode of all running.

One step is either the prefill of ONE waiting request (its whole prompt: the pool is chosen
during prefill over all prompt tokens, EMO's rule, so prefill is never chunked) or one decode
of every running sequence. A prefill is chosen when a request is waiting and admissible, but
never twice in a row while sequences are running, so decoding is never starved.

Admission of a request needs a free KV slot, ``len(running) < max_num_seqs`` and, by the
expert store (see pool_budget.py): pool requests need their ``P x layers`` slots free; full
routing ones a small reserve. Among the first ``lookahead`` admissible waiting requests the one
whose predicted pool is most resident goes first (FIFO on ties; full-routing requests and
requests without a prediction score the mean residency of all experts). A request that has waited
more than ``max_wait_steps`` scheduler steps is served strictly first: while it is not
admissible nobody else is admitted, so running work drains until it fits (bounded wait).
"""

from __future__ import annotations

from dataclasses import dataclass

from server.engine.kv_slots import KVSlotAllocator
from server.engine.pool_budget import PoolBudget
from server.engine.sequence import SeqStatus, Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 16
    max_wait_steps: int = 64
    lookahead: int = 8

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
        self.running: list[Sequence] = []
        self._last_was_prefill = False
        # set when a pool prefill hit SlotsExhausted: no pool admission until pins are released
        self._pool_blocked = False

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def schedule(self) -> Step | None:
        """The next step, or None when there is nothing that can run now."""
        for seq in self.waiting:
            seq.waited_steps += 1
        if self.waiting and not (self.running and self._last_was_prefill):
            picked = self._pick()
            if picked is not None:
                slot = self.kv.allocate()
                assert slot is not None  # _pick checked kv.num_free
                self.waiting.remove(picked)
                picked.slot, picked.status = slot, SeqStatus.RUNNING
                self.running.append(picked)
                self._last_was_prefill = True
                return Prefill(picked)
        self._last_was_prefill = False
        if self.running:
            return Decode(list(self.running))
        return None

    def _pick(self) -> Sequence | None:
        if len(self.running) >= self.config.max_num_seqs or self.kv.num_free == 0:
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
        full_running = any(s.pool_size is None for s in self.running)
        pinned = frozenset(k for s in self.running for k in s.pinned)
        return self.budget.can_admit_pool(seq.pool_size, full_running, seq.predicted_keys, pinned)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (finished, aborted or failed) and free its KV slot. The caller
        releases its expert pins."""
        if seq in self.running:
            self.running.remove(seq)
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
        sequence finishes (its pins are what the prefill lacked)."""
        self.running.remove(seq)
        if seq.slot is not None:
            self.kv.free(seq.slot)
            seq.slot = None
        seq.status = SeqStatus.WAITING
        self.waiting.insert(0, seq)
        self._pool_blocked = self._pool_blocked or block_pools
