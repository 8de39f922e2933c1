"""Engine test helpers: the tiny synthetic model, engines that are always shut down, and a
thread-safe collector of streamed outputs."""

from __future__ import annotations

import random
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from server.engine.config import EngineConfig
from server.engine.engine import Engine
from server.engine.request import GenerationRequest, RequestOutput, SamplingParams
from server.model.loader import LoadedModel, load_model
from server.tools.synth import sample_prompt


@pytest.fixture(scope="module")
def loaded(tiny_emo_checkpoint: Path) -> LoadedModel:
    return load_model(tiny_emo_checkpoint, device="cpu", dtype="fp32")


EngineFactory = Callable[..., Engine]


@pytest.fixture()
def make_engine(loaded: LoadedModel) -> Iterator[EngineFactory]:
    engines: list[Engine] = []

    def make(model: LoadedModel | None = None, start: bool = True, registry: CollectorRegistry | None = None,
             **config: object) -> Engine:
        engine = Engine(model or loaded, EngineConfig(**config), registry)  # type: ignore[arg-type]
        engines.append(engine)
        if start:
            engine.start()
        return engine

    yield make
    for engine in engines:
        engine.shutdown(grace_s=0.0)


class Collector:
    """on_output callback gathering every output per request."""

    def __init__(self) -> None:
        self.outputs: dict[str, list[RequestOutput]] = defaultdict(list)
        self._cond = threading.Condition()
        self.events: dict[str, threading.Event] = defaultdict(threading.Event)

    def __call__(self, out: RequestOutput) -> None:
        with self._cond:
            self.outputs[out.request_id].append(out)
            self.events[out.request_id].set()
            self._cond.notify_all()

    def wait(self, ids: list[str], timeout: float = 120.0) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: all(self.finished(i) for i in ids), timeout)
        assert ok, f"requests did not finish: {[i for i in ids if not self.finished(i)]}"

    def finished(self, rid: str) -> bool:
        outs = self.outputs.get(rid)
        return bool(outs) and outs[-1].finished

    def last(self, rid: str) -> RequestOutput:
        return self.outputs[rid][-1]

    def tokens(self, rid: str) -> list[int]:
        return [t for o in self.outputs[rid] for t in o.new_token_ids]

    def text(self, rid: str) -> str:
        return "".join(o.new_text for o in self.outputs[rid])


def prompt_ids(loaded: LoadedModel, domain: int, words: int, seed: int) -> list[int]:
    return loaded.tokenizer.encode(sample_prompt(domain, words, random.Random(seed)))


def run_all(engine: Engine, requests: list[GenerationRequest]) -> Collector:
    c = Collector()
    for r in requests:
        engine.submit(r, c)
    c.wait([r.request_id for r in requests])
    return c


def greedy(n: int, **kw: object) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)  # type: ignore[arg-type]
