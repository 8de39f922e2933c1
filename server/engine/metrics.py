"""Request-level Prometheus metrics of the engine (emo_serve_ prefix; names and buckets follow
vLLM's ``vllm:`` metrics where they mean the same thing).

Device memory gauges: ``torch.cuda.memory_allocated / memory_reserved`` of the engine's device
when it is CUDA; on CPU both report the process resident set size (from /proc/self/statm, 0
where that is unavailable), which is what model weights and KV occupy there. They are updated
by the engine thread (the only thread that touches the device), at most once a second.
"""

from __future__ import annotations

import os
import time

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
FINISH_REASONS = ("stop", "length", "abort", "error")


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class EngineMetrics:
    def __init__(self, registry: CollectorRegistry, device: torch.device) -> None:
        self.device = device
        self.num_running = Gauge("emo_serve_num_requests_running",
                                 "Requests in the running batch (KV slot held).", registry=registry)
        self.num_waiting = Gauge("emo_serve_num_requests_waiting",
                                 "Requests waiting to be admitted.", registry=registry)
        self.num_loading = Gauge("emo_serve_num_requests_loading",
                                 "Admitted requests parked while loader threads page in their experts "
                                 "(running streams keep decoding meanwhile).", registry=registry)
        self.pool_load = Histogram("emo_serve_pool_load_seconds",
                                   "Admission to the whole expert pool pinned resident, by the slowest "
                                   "tier any of its experts came from (device, host or disk).",
                                   ["source"], buckets=TTFT_BUCKETS, registry=registry)
        self.kv_usage = Gauge("emo_serve_kv_cache_usage_perc",
                              "Fraction of KV cache slots in use (1 = 100%).", registry=registry)
        self.prompt_tokens = Counter("emo_serve_prompt_tokens",
                                     "Prompt tokens prefilled.", registry=registry)
        self.generation_tokens = Counter("emo_serve_generation_tokens",
                                         "Tokens generated.", registry=registry)
        self.request_success = Counter("emo_serve_request_success",
                                       "Finished requests by finish_reason (error and abort included).",
                                       ["finish_reason"], registry=registry)
        for reason in FINISH_REASONS:
            self.request_success.labels(finish_reason=reason)
        self.ttft = Histogram("emo_serve_time_to_first_token_seconds",
                              "Arrival to first generated token.", buckets=TTFT_BUCKETS,
                              registry=registry)
        self.itl = Histogram("emo_serve_inter_token_latency_seconds",
                             "Time between consecutive generated tokens of a request (time per "
                             "output token).", buckets=ITL_BUCKETS, registry=registry)
        self.e2e = Histogram("emo_serve_e2e_request_latency_seconds", "Arrival to finish.",
                             buckets=LATENCY_BUCKETS, registry=registry)
        self.queue_time = Histogram("emo_serve_request_queue_time_seconds",
                                    "Arrival to the start of the request's prefill.",
                                    buckets=LATENCY_BUCKETS, registry=registry)
        self.backoffs = Counter("emo_serve_expert_slot_backoffs",
                                "Steps retried or requeued because device expert slots ran out.",
                                registry=registry)
        self.step_errors = Counter("emo_serve_step_errors",
                                   "Engine steps that raised (their requests failed).", registry=registry)
        self.mem_allocated = Gauge("emo_serve_device_memory_allocated_bytes",
                                   "torch.cuda.memory_allocated on CUDA; process RSS on CPU.",
                                   registry=registry)
        self.mem_reserved = Gauge("emo_serve_device_memory_reserved_bytes",
                                  "torch.cuda.memory_reserved on CUDA; process RSS on CPU.",
                                  registry=registry)
        self._mem_updated = 0.0
        self.pool_requests = Counter("emo_serve_pool_requests",
                                     "Requests run on a named expert pool (POST /v1/pools), by pool.",
                                     ["pool"], registry=registry)
        # vLLM's vllm:lora_requests_info, which the Gateway API Inference Extension's endpoint
        # picker reads for adapter affinity: the labels carry the state, the value is the time
        # of its last change. One series only: the old one is removed when the state changes.
        self.pool_info = Gauge("emo_serve_lora_requests_info",
                               "Named pools (as LoRA adapters) running and waiting; value: time of "
                               "the last change.",
                               ["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
                               registry=registry)
        self._pool_info_labels: tuple[str, str, str] | None = None

    def update_pool_info(self, running: list[str], waiting: list[str], max_pools: int) -> None:
        """Named-pool model ids of running (and resident) and of waiting requests, and how many
        default-size pools the device tier holds."""
        labels = (",".join(sorted(set(running))), ",".join(sorted(set(waiting))), str(max_pools))
        if labels == self._pool_info_labels:
            return
        if self._pool_info_labels is not None:
            self.pool_info.remove(*self._pool_info_labels)
        self.pool_info.labels(*labels).set(time.time())
        self._pool_info_labels = labels

    def update_memory(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now - self._mem_updated < 1.0:
            return
        self._mem_updated = now
        if self.device.type == "cuda":
            self.mem_allocated.set(torch.cuda.memory_allocated(self.device))
            self.mem_reserved.set(torch.cuda.memory_reserved(self.device))
        else:
            rss = _rss_bytes()
            self.mem_allocated.set(rss)
            self.mem_reserved.set(rss)
