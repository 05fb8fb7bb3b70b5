"""Configuration of one benchmark: where to send requests, what to send, and when.

One frozen dataclass per concern, validated on construction with a `ValueError` that names the flag to
change. The CLI builds them from flags; tests build them directly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SLO_METRICS = ("ttft", "tpot", "e2el")
ARRIVALS = ("poisson", "gamma", "constant", "trace")
PROMPT_FORMATS = ("text", "token_ids")
SYNTHETIC_DATASETS = ("synthetic-chat", "synthetic-code", "synthetic-summarization")
DATASETS = ("random", *SYNTHETIC_DATASETS, "jsonl", "sharegpt")
_GOODPUT_EXAMPLE = "--goodput ttft:500 tpot:100"


def parse_slos(pairs: list[str] | str | None) -> dict[str, float]:
    """Parse `--goodput` KEY:VALUE pairs (milliseconds) into {"ttft": ms, ...}.

    Accepts a list of pairs or one space-separated string; raises ValueError saying what to write.
    """
    if pairs is None:
        return {}
    if isinstance(pairs, str):
        pairs = pairs.split()
    slos: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition(":")
        name = name.strip().lower()
        if not sep or not name or not value.strip():
            raise ValueError(f"--goodput: {pair!r} is not KEY:VALUE; write e.g. {_GOODPUT_EXAMPLE} "
                             f"(milliseconds; keys: {', '.join(SLO_METRICS)})")
        if name not in SLO_METRICS:
            raise ValueError(f"--goodput: unknown metric {name!r} in {pair!r}; "
                             f"use one of {', '.join(SLO_METRICS)}, e.g. {_GOODPUT_EXAMPLE}")
        try:
            millis = float(value)
        except ValueError:
            raise ValueError(f"--goodput: {value!r} in {pair!r} is not a number of milliseconds; "
                             f"write e.g. {_GOODPUT_EXAMPLE}") from None
        if not math.isfinite(millis) or millis <= 0:
            raise ValueError(f"--goodput: {name} must be a positive number of milliseconds, got {value!r}")
        if name in slos:
            raise ValueError(f"--goodput: {name} is given twice; give each metric once")
        slos[name] = millis
    return slos


def parse_tenants(spec: str | None) -> tuple[tuple[str, float], ...]:
    """Parse `--tenants a:3,b:1` into ((name, weight), ...); weights are relative traffic shares."""
    if not spec:
        return ()
    tenants: list[tuple[str, float]] = []
    for item in spec.split(","):
        name, sep, weight = item.strip().partition(":")
        try:
            value = float(weight) if sep else 1.0
        except ValueError:
            raise ValueError(f"--tenants: weight {weight!r} of {name!r} is not a number; "
                             "write e.g. --tenants alice:3,bob:1") from None
        if not name or not math.isfinite(value) or value <= 0:
            raise ValueError(f"--tenants: {item!r} needs a name and a positive weight, "
                             "e.g. --tenants alice:3,bob:1")
        tenants.append((name, value))
    names = [name for name, _ in tenants]
    if len(set(names)) != len(names):
        raise ValueError(f"--tenants: names must be distinct, got {', '.join(names)}")
    return tuple(tenants)


@dataclass(frozen=True)
class EndpointConfig:
    """The server under test, reached over HTTP only."""
    base_url: str = ""  # empty until known (side-by-side runs fill it in per system)
    endpoint: str = "/v1/completions"
    model: str | None = None  # served model name; None: the first one /v1/models lists
    api_key: str | None = None
    request_timeout_s: float = 3600.0
    ignore_eos: bool = False
    temperature: float | None = None  # None: the server's default
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.base_url and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"--base-url must start with http:// or https://, got {self.base_url!r}")
        if not self.endpoint.endswith("completions"):
            raise ValueError("--endpoint must be /v1/completions or /v1/chat/completions, "
                             f"got {self.endpoint!r}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"--request-timeout must be positive, got {self.request_timeout_s}")

    @property
    def is_chat(self) -> bool:
        return self.endpoint.endswith("chat/completions")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/" + self.endpoint.lstrip("/")


@dataclass(frozen=True)
class WorkloadConfig:
    """What to send: prompts, their lengths, turns and tenants. Same seed, same workload."""
    dataset_name: str = "random"
    dataset_path: str | None = None
    num_prompts: int = 200  # conversations; each has num_turns requests
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    output_len: int | None = None  # overrides every dataset's output lengths
    num_turns: int = 1
    think_time_s: float = 0.0
    tenants: tuple[tuple[str, float], ...] = ()
    prompt_format: str = "text"
    # > 0: every request carries a `priority` drawn anew per turn from [0, levels) (lower runs first
    # under --scheduling-policy priority): a conversation's priority changes at every turn
    priority_levels: int = 0
    max_model_len: int | None = None  # clip prompt + output to fit the server's context
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dataset_name not in DATASETS:
            raise ValueError(f"--dataset-name must be one of {', '.join(DATASETS)}, "
                             f"got {self.dataset_name!r}")
        if self.dataset_name == "jsonl" and not self.dataset_path:
            raise ValueError("--dataset-name jsonl needs --dataset-path FILE")
        if self.num_prompts < 1:
            raise ValueError(f"--num-prompts must be at least 1, got {self.num_prompts}")
        if self.random_input_len < 1 or self.random_output_len < 1:
            raise ValueError("--random-input-len and --random-output-len must be at least 1")
        if not 0.0 <= self.random_range_ratio < 1.0:
            raise ValueError(f"--random-range-ratio must be in [0, 1), got {self.random_range_ratio}")
        if self.output_len is not None and self.output_len < 1:
            raise ValueError(f"--output-len must be at least 1, got {self.output_len}")
        if self.num_turns < 1 or self.think_time_s < 0:
            raise ValueError("--num-turns must be at least 1 and --think-time at least 0")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"--prompt-format must be one of {', '.join(PROMPT_FORMATS)}")
        if self.prompt_format == "token_ids" and self.num_turns > 1:
            raise ValueError("multi-turn conversations resend the server's text replies; "
                             "use --prompt-format text with --num-turns > 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"--max-model-len must be at least 2, got {self.max_model_len}")
        if self.priority_levels < 0:
            raise ValueError(f"--priority-levels must be 0 (no priorities) or more, got {self.priority_levels}")


@dataclass(frozen=True)
class LoadConfig:
    """When to send: the arrival process and the client-side concurrency cap."""
    request_rate: float = math.inf  # conversations per second; inf: all at once
    arrival: str = "poisson"
    burstiness: float = 1.0  # gamma shape; 1 is Poisson, < 1 burstier, > 1 smoother
    max_concurrency: int | None = None
    trace_time_scale: float = 1.0  # trace replay: multiply the file's timestamps by this

    def __post_init__(self) -> None:
        if self.arrival not in ARRIVALS:
            raise ValueError(f"--arrival must be one of {', '.join(ARRIVALS)}, got {self.arrival!r}")
        if not self.request_rate > 0:
            raise ValueError(f"--request-rate must be positive (or inf), got {self.request_rate}")
        if not self.burstiness > 0:
            raise ValueError(f"--burstiness must be positive, got {self.burstiness}")
        if self.arrival == "poisson" and self.burstiness != 1.0:
            raise ValueError("--burstiness other than 1 needs --arrival gamma (Poisson is gamma with "
                             "burstiness 1)")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be at least 1, got {self.max_concurrency}")
        if not self.trace_time_scale > 0:
            raise ValueError(f"--trace-time-scale must be positive, got {self.trace_time_scale}")
