"""The EMO training recipe (document pools of random size) and its standard-MoE control."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from server.tools.demo.train.config import DemoModelConfig
from server.tools.demo.train.data import Batch
from server.tools.demo.train.model import EmoForTraining
from server.tools.demo.train.plan import RoutePlan


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    lb_weight: float = 0.1
    use_pools: bool = True  # False: the standard-MoE control (per-token routing only)
    pool_min: int = 4  # document pool sizes drawn uniformly from [pool_min, pool_max]
    pool_max: int = 32
    seed: int = 0
    log_every: int = 25
    time_budget_s: float | None = None  # schedule and stop by wall time when it runs out first
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2:
            raise ValueError("TrainConfig needs steps >= 1, batch_size >= 1, seq_len >= 2")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError("TrainConfig.warmup_steps must be in [0, steps)")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1):
            raise ValueError("TrainConfig.lr must be > 0 and min_lr_ratio in [0, 1]")
        if not 1 <= self.pool_min <= self.pool_max:
            raise ValueError("TrainConfig needs 1 <= pool_min <= pool_max")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError("TrainConfig.time_budget_s must be > 0")


@dataclass
class TrainResult:
    steps: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0
    history: list[dict[str, float]] = field(default_factory=list)

    def final(self, key: str, last: int = 3) -> float:
        """Mean of `key` over the last `last` logged entries."""
        tail = self.history[-last:]
        return sum(h[key] for h in tail) / max(len(tail), 1)


def lr_at(cfg: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up over steps, then cosine decay to min_lr_ratio * lr over the run's progress."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: EmoForTraining, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed_tokens" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed_tokens" in n]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8)


def train_step_loss(
    model: EmoForTraining, batch: Batch, cfg: TrainConfig, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy, load-balancing loss) of one batch under the configured routing."""
    c: DemoModelConfig = model.config
    device = torch.device(cfg.device)
    plan = RoutePlan.from_segments(batch.segments.to(device), batch.valid.to(device))
    if cfg.use_pools:
        high = min(cfg.pool_max, c.routable_experts)
        plan.with_random_pool_sizes(c.num_layers, max(cfg.pool_min, c.num_routed), high, generator)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits, lb = model(batch.input_ids.to(device), plan)
    ce = F.cross_entropy(
        logits.view(-1, logits.shape[-1]), batch.labels.to(device).view(-1), ignore_index=-100
    )
    return ce, lb


def train(
    model: EmoForTraining,
    cfg: TrainConfig,
    data: Iterator[Batch],
    log: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)  # pool sizes: same draws on every device
    model.to(cfg.device).train()
    optimizer = make_optimizer(model, cfg)
    result = TrainResult()
    start = time.monotonic()
    window_ce = window_lb = 0.0
    window_n = 0
    for step in range(cfg.steps):
        elapsed = time.monotonic() - start
        progress = step / cfg.steps
        if cfg.time_budget_s is not None:
            progress = max(progress, elapsed / cfg.time_budget_s)
            if progress >= 1.0:
                break
        lr = lr_at(cfg, step, progress)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = next(data)
        ce, lb = train_step_loss(model, batch, cfg, generator)
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(ce + cfg.lb_weight * lb)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        result.steps = step + 1
        result.tokens_seen += batch.num_tokens
        window_ce, window_lb, window_n = (
            window_ce + float(ce.detach()),
            window_lb + float(lb.detach()),
            window_n + 1,
        )
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            seconds = time.monotonic() - start
            entry = {
                "step": step + 1,
                "lr": lr,
                "ce": window_ce / window_n,
                "lb": window_lb / window_n,
                "tokens": result.tokens_seen,
                "seconds": seconds,
                "tok_per_s": result.tokens_seen / seconds,
            }
            result.history.append(entry)
            window_ce = window_lb = 0.0
            window_n = 0
            if log is not None:
                log(entry)
    result.seconds = time.monotonic() - start
    model.eval()
    return result
