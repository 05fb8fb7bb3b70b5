"""Step traces: every step a serving engine computes, its shape and how long it took, one JSON line each,
and a latency model fitted from them (the step cost *in place*, not in a profile run alone).

    {"t": 1764612345.123, "s": 0.0312, "prefill": [256], "decode": [301, 412]}

`t` is the wall-clock start (seconds since the epoch), `s` the step's duration as the executor measured
it, `prefill` the length of each prefill chunk in the step, `decode` the context length of each decode
row, classified as the simulator's latency-model executor classifies them (scheduler/latency_executor.py),
so a trace prices the same features the simulator charges for.

A pipelined engine (pipeline parallelism: plans in flight) adds three keys per plan:

    {..., "hold": 0.0213, "work": 0.0302, "alone": false}

`s` is then the plan's latency from its submit to its result, which includes waiting behind the plans
ahead of it unless it was `alone` (no other plan with tokens in flight when it was submitted). `work` is
its own way through the stages without that wait: rank 0's submit (the hand-over and stage 0's step)
plus each later stage's step less its wait for activations. `hold` is how long it held the busiest
stage: the engine's own time for it (stage 0 is the engine's thread: it computes the plan's first
layers, schedules, hands the plan on, applies results between one submit and the next; waits for
results not counted) or a later stage's step, whichever is longer; absent where the engine went idle
before the next submit. `fit_pipelined` fits the latency on every plan's work (plus the hand-offs
between stages, the mean of `s - work` over the lone plans) and the stage hold on every plan's hold:
the two things the simulator's pipelined executor prices.

A profile (`pdserve profile`) times one runner alone on an idle machine; a served instance shares its
cores, memory bandwidth and process with the API server, the router, KV transfer and its neighbours,
and on a CPU box that costs 20-50% per step (docs/benchmarks.md, "Simulated against measured"). An
engine started with `--step-trace-dir DIR` writes `DIR/<role>-<pid>.jsonl`; `pdserve profile
--from-trace FILE...` fits the model from those lines (`fit`): decode from pure decode steps, prefill
from pure prefill steps and from mixed steps with their decode part (from the decode fit) taken off.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from scheduler.latency_model import LatencyModel, PhaseCoefficients, fit_decode, fit_weighted
from scheduler.step import StepPlan, is_decode_row

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TracedStep:
    started: float                 # wall clock, seconds since the epoch
    seconds: float
    prefill: tuple[int, ...]       # chunk lengths
    decode: tuple[int, ...]        # context lengths (the new token included)
    hold: float | None = None      # a pipelined engine's: the busiest stage's hold
    alone: bool | None = None      # a pipelined engine's: no other plan in flight at its submit
    work: float | None = None      # a pipelined engine's: its way through the stages, no waits


def classify(plan: StepPlan, requests: dict) -> tuple[list[int], list[int]]:
    """(prefill chunk lengths, decode context lengths) of a plan, from the scheduler's requests as
    schedule() leaves them (num_computed_tokens already counts the plan's tokens). A decode row computes
    the one token after everything computed before it."""
    chunks: list[int] = []
    contexts: list[int] = []
    for request_id, num_tokens in plan.num_scheduled_tokens.items():
        request = requests.get(request_id)
        if request is None:
            continue
        computed = request.num_computed_tokens - num_tokens  # schedule() already counted the step's tokens
        if is_decode_row(num_tokens, computed, request.num_tokens):
            contexts.append(computed + 1)
        else:
            chunks.append(num_tokens)
    return chunks, contexts


class StepTrace:
    """Appends one JSON line per computed step to `path`, written through at once (one write per step, a
    few microseconds against steps of milliseconds; a process killed or ended with os._exit loses no
    line but, at worst, a torn last one). Never raises into the engine loop: a write that fails turns
    tracing off and says so in `error`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)  # line-buffered
        self.num_steps = 0
        self.error: str | None = None

    @classmethod
    def in_dir(cls, directory: str | os.PathLike, role: str) -> "StepTrace":
        return cls(Path(directory) / f"{role}-{os.getpid()}.jsonl")

    def record(self, started: float, seconds: float, chunks: list[int], contexts: list[int],
               hold: float | None = None, alone: bool | None = None, work: float | None = None) -> None:
        if self._file is None or not (chunks or contexts):
            return
        row = {"t": round(started, 6), "s": round(seconds, 7), "prefill": chunks, "decode": contexts}
        if hold is not None:
            row["hold"] = round(hold, 7)
        if work is not None:
            row["work"] = round(work, 7)
        if alone is not None:
            row["alone"] = alone
        try:
            self._file.write(json.dumps(row, separators=(",", ":")) + "\n")
            self.num_steps += 1
        except (OSError, ValueError) as e:
            self.error = f"step trace {self.path} stopped: {e}"
            logger.warning("%s (the engine goes on without it)", self.error)
            self.close()

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None


def read(paths: Iterable[str | os.PathLike], since: float | None = None, until: float | None = None
         ) -> list[TracedStep]:
    """The steps of every file (a directory: every *.jsonl in it), optionally those started within
    [since, until). A torn last line (a process killed mid-write) is skipped; any other bad line is an
    error naming the file and line."""
    files: list[Path] = []
    for path in paths:
        path = Path(path)
        files.extend(sorted(path.glob("*.jsonl")) if path.is_dir() else [path])
    steps = []
    for file in files:
        lines = file.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
                hold, alone, work = row.get("hold"), row.get("alone"), row.get("work")
                step = TracedStep(float(row["t"]), float(row["s"]), tuple(int(n) for n in row["prefill"]),
                                  tuple(int(n) for n in row["decode"]), None if hold is None else float(hold),
                                  None if alone is None else bool(alone), None if work is None else float(work))
            except (ValueError, KeyError, TypeError) as e:
                if number == len(lines):
                    continue  # torn last line
                raise ValueError(f"{file}:{number}: not a step trace line ({e})") from e
            if (since is None or step.started >= since) and (until is None or step.started < until):
                steps.append(step)
    return steps


def fit(steps: list[TracedStep], meta: dict | None = None, min_steps: int = 8) -> LatencyModel:
    """A latency model from traced steps: decode on pure decode steps; prefill on pure prefill steps plus
    mixed steps less their decode part (decode_time(contexts) - min(a_prefill, a_decode) is what the
    simulator adds for a mixed step, so the prefill fit sees what is left). Raises ValueError when
    either phase has too few steps to fit (fewer than `min_steps`), saying which."""
    decode_only = [s for s in steps if s.decode and not s.prefill]
    if len(decode_only) < min_steps:
        raise ValueError(f"{len(decode_only)} pure decode steps in the trace; the fit needs {min_steps}: trace a run "
                         "that decodes (a decode instance, or a colocated one with requests finishing)")
    decode = fit_decode([list(s.decode) for s in decode_only], [s.seconds for s in decode_only])
    # A mixed step costs prefill + decode - min(a_prefill, a_decode). Fit both cases and keep the one
    # that agrees with its own assumption: a_prefill >= a_decode (the mixed step, less its decode part,
    # plus a_decode, is a whole prefill step) or a_prefill < a_decode (less its decode part it is a
    # prefill step without its intercept).
    with_prefill = [s for s in steps if s.prefill]
    if len(with_prefill) < min_steps:
        raise ValueError(f"{len(with_prefill)} steps with prefill in the trace; the fit needs {min_steps}: trace a "
                         "run that prefills (a prefill instance, or a colocated one under load)")
    fits = []
    for prefill_a_above in (True, False):
        rows, seconds = [], []
        for step in with_prefill:
            length, squares = sum(step.prefill), sum(n * n for n in step.prefill)
            y = step.seconds
            if step.decode:
                y -= decode.a + decode.b * sum(step.decode) + decode.c * len(step.decode)
                y += decode.a if prefill_a_above else 0.0
            pure_or_above = 1.0 if (prefill_a_above or not step.decode) else 0.0
            rows.append([pure_or_above, length, squares])
            seconds.append(y)
        coefficients = fit_weighted(np.array(rows, dtype=np.float64), np.array(seconds, dtype=np.float64))
        consistent = (coefficients.a >= decode.a) == prefill_a_above
        fits.append((not consistent, _relative_error(rows, seconds, coefficients), coefficients))
    prefill = min(fits, key=lambda fit: fit[:2])[2]
    info = {"source": "step trace", "num_decode_steps": len(decode_only), "num_prefill_steps": len(with_prefill),
            "num_mixed_steps": sum(1 for s in steps if s.prefill and s.decode)}
    return LatencyModel(prefill, decode, {**info, **(meta or {})})



def is_pipelined(steps: list[TracedStep]) -> bool:
    """Whether the steps were traced by a pipelined engine (they say whether each plan was alone)."""
    return any(step.alone is not None for step in steps)


def fit_pipelined(steps: list[TracedStep], meta: dict | None = None, min_steps: int = 8) -> LatencyModel:
    """A pipelined engine's latency model from its traced plans: the latency through every stage
    (`fit` on every plan's `work`, its intercepts raised by the hand-offs: the mean of `s - work`
    over the plans that were alone in the pipeline, whose `s` is their own) and, as `meta["stage"]`,
    the busiest stage's hold (`fit` on every plan's `hold`). Fitting the lone plans' `s` alone would
    not do: they are mostly one-row decodes, which cannot tell a step's fixed cost from its cost per
    row. Raises ValueError when the trace is not a pipelined engine's or either fit has too few
    plans, saying which."""
    if not is_pipelined(steps):
        raise ValueError("these steps were not traced by a pipelined engine (no plan says whether it was alone "
                         "in the pipeline): fit them with `fit` (pdserve profile --from-trace without "
                         "--pipeline-parallel-size)")
    fits, num_plans = {}, {}
    for key in ("work", "hold"):
        plans = [TracedStep(s.started, getattr(s, key), s.prefill, s.decode) for s in steps
                 if getattr(s, key) is not None]
        try:
            fits[key], num_plans[key] = fit(plans, min_steps=min_steps), len(plans)
        except ValueError as e:
            raise ValueError(f"of the plans with a traced {key}: {e}") from None
    alone = [s for s in steps if s.alone and s.work is not None]
    hand_offs = max(0.0, float(np.mean([s.seconds - s.work for s in alone]))) if alone else 0.0
    work, stage = fits["work"], fits["hold"]
    prefill = PhaseCoefficients(work.prefill.a + hand_offs, work.prefill.b, work.prefill.c, work.prefill.r2)
    decode = PhaseCoefficients(work.decode.a + hand_offs, work.decode.b, work.decode.c, work.decode.r2)
    info = {**work.meta, "num_alone_plans": len(alone), "hand_off_seconds": hand_offs,
            "num_held_plans": num_plans["hold"],
            "stage": {"prefill": asdict(stage.prefill), "decode": asdict(stage.decode)}}
    return LatencyModel(prefill, decode, {**info, **(meta or {})})


def _relative_error(rows: list[list[float]], seconds: list[float], fit: PhaseCoefficients) -> float:
    predicted = np.array(rows) @ np.array([fit.a, fit.b, fit.c])
    actual = np.maximum(np.array(seconds), 1e-9)
    return float(np.mean(np.abs(predicted - actual) / actual))
