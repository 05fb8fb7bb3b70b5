"""What the client measured about one request; the only input of bench.metrics."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestRecord:
    """Times are seconds on the client's clock: `arrival_s` and `start_s` after the benchmark start,
    the rest relative to `start_s` (the moment the request was sent).

        arrival_s   start_s        start_s+ttft_s      ...        start_s+e2el_s
           |  queued   | prefill+network |  itl_s[0]  |  itl_s[1]  |
           +-----------+-----------------+------------+------------+
                        first token chunk           each later token chunk
    """
    request_id: str
    tenant: str = "default"
    conversation_id: int = 0
    turn_index: int = 0
    num_prompt_tokens: int = 0  # the server's usage.prompt_tokens when given, else the client's count
    num_output_tokens: int = 0  # the server's usage.completion_tokens when given, else counted here
    max_output_tokens: int = 0  # max_tokens sent
    arrival_s: float = 0.0  # when the arrival process released it
    start_s: float = 0.0  # when it was sent; later than arrival_s when --max-concurrency held it back
    success: bool = False
    ttft_s: float = 0.0
    itl_s: list[float] = field(default_factory=list)  # gaps between successive token chunks
    e2el_s: float = 0.0  # send to last token chunk
    generated_text: str = ""
    error: str = ""
    http_status: int | None = None  # None: no response came (a transport error, or the client gave up)
    finish_reasons: list[str] = field(default_factory=list)  # one per choice, as the server sent them

    @property
    def queue_s(self) -> float:
        return self.start_s - self.arrival_s

    @property
    def tpot_s(self) -> float:
        """`vllm bench serve`'s TPOT: (e2el - ttft) / (output tokens - 1); 0 for one output token."""
        if self.num_output_tokens <= 1:
            return 0.0
        return (self.e2el_s - self.ttft_s) / (self.num_output_tokens - 1)

    def token_times_s(self) -> list[float]:
        """Arrival of each token chunk, seconds after the benchmark start."""
        if not self.success:
            return []
        times = [self.start_s + self.ttft_s]
        for gap in self.itl_s:
            times.append(times[-1] + gap)
        return times
