"""What the engine core keeps per request beside its Sequence: the request itself, how its
tokens are picked (sampling state) and turned into text (detokenizer), where its outputs go,
and its timing. The scheduler and the model runner never see it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from server.engine.detokenizer import Detokenizer
from server.engine.request import GenerationRequest, RequestOutput
from server.engine.sampler import SamplingState
from server.engine.sequence import Sequence


@dataclass
class RequestTimes:
    """time.monotonic() stamps."""

    arrival: float
    scheduled: float | None = None  # admitted: prefill started (end of queueing)
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None


@dataclass(eq=False)
class RequestState:
    request: GenerationRequest
    seq: Sequence
    on_output: Callable[[RequestOutput], None]
    sampling: SamplingState
    detok: Detokenizer
    times: RequestTimes
    cancelled: bool = False  # its consumer raised: finish it at the next step
    prompt_logprobs_sent: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def append(self, token_id: int) -> None:
        self.seq.output_ids.append(token_id)
        self.sampling.record(token_id)
