"""Step latency of a parallel plan (tensor parallel x pipeline parallel): a profiled fit when there is
one, else the nearest profiled plan scaled by a documented rule.

A latency-model *set* is one JSON file per plan, each written by `pdserve profile` (its `meta` says
`tp` and `pp`; absent means 1), given as files or as a directory of them. `LatencyModelSet.for_plan`
returns the fit of that plan if it was profiled, else a `PlanLatency` scaled from a profiled plan
with pp = 1 and the largest tp that divides the wanted tp (the rule below), and says which.

Fallback scaling rule, from a base fit at tp0 (pp 1) to a plan tp x pp (W: the variable terms of a
step, b·Σlen + c·Σlen² for prefill, b·Σcontext + c·rows for decode; a: the fixed term):

    tensor parallel    W x tp0/tp          every rank computes 1/tp of the FLOPs and reads 1/tp of the
                                           weights and of the KV
                       a unchanged         launch and framework overhead per step
                       + 2·L collectives per step (attention output, MLP output), ring all-reduce:
                         latency  2·L·allreduce_latency_s                     (per step, tp > tp0)
                         bytes    2·L · 2(tp−1)/tp · hidden·dtype_bytes / bw  (per token of the step)
    pipeline parallel  a plan goes through the pp stages (L/pp layers each) one after the other, so
                       alone it costs its whole work and the hidden state's hops:
                         a + W + (pp−1)·(p2p_latency + tokens·hidden·dtype_bytes / bw)
                       what pipelining buys is plans in flight, as the runtime runs them (vLLM's batch
                       queue): the latency-model executor gives each stage 1/pp of that latency and
                       lets the next plan into a stage as soon as it is free (up to pp plans in
                       flight, each with 1/pp of the running requests), so a full pipeline delivers
                       pp plans per latency and a lone prompt gets no faster (the bubble).
                       A profiled pp plan (`pdserve profile --pipeline-parallel-size`) is that same
                       lone-plan latency, measured.

Communication bandwidths come from the cluster (intra-node for TP, which never crosses a node; the
pipeline's link for PP). With no communication model given, the collectives cost nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from scheduler.latency_model import LatencyModel, PhaseCoefficients


@dataclass(frozen=True)
class CommModel:
    """What a plan's collectives cost: the model's shape and the links' speed."""
    num_layers: int
    hidden_size: int
    dtype_bytes: int
    tp_bytes_per_s: float  # the links a TP group's all-reduces use (within a node)
    pp_bytes_per_s: float  # the link between consecutive pipeline stages
    allreduce_latency_s: float = 10e-6
    p2p_latency_s: float = 10e-6

    def tp_seconds(self, tp: int, tp0: int, num_tokens: int) -> float:
        if tp <= tp0 or tp <= 1:
            return 0.0
        collectives = 2 * self.num_layers
        volume = collectives * 2 * (tp - 1) / tp * self.hidden_size * self.dtype_bytes * num_tokens
        return collectives * self.allreduce_latency_s + volume / self.tp_bytes_per_s

    def pp_seconds(self, pp: int, num_tokens: int) -> float:
        if pp <= 1:
            return 0.0
        return (pp - 1) * (self.p2p_latency_s + num_tokens * self.hidden_size * self.dtype_bytes / self.pp_bytes_per_s)


@dataclass(frozen=True)
class PlanLatency:
    """A base fit scaled to tp x pp (the rule in the module docstring). Has what the latency-model
    executor reads: prefill_time, decode_time and the fixed terms prefill.a, decode.a."""
    base: LatencyModel
    tp: int = 1
    pp: int = 1
    base_tp: int = 1
    comm: CommModel | None = None

    @property
    def prefill(self) -> PhaseCoefficients:
        return self.base.prefill

    @property
    def decode(self) -> PhaseCoefficients:
        return self.base.decode

    @property
    def meta(self) -> dict:
        return {**self.base.meta, "tp": self.tp, "pp": self.pp, "scaled_from_tp": self.base_tp}

    def swap_cost(self):
        """The base plan's (a rank copies its own share of each block at the same host link speed)."""
        return self.base.swap_cost()

    def _scaled(self, a: float, work: float, num_tokens: int) -> float:
        seconds = a + work * self.base_tp / self.tp
        if self.comm is not None:
            seconds += self.comm.tp_seconds(self.tp, self.base_tp, num_tokens)
            seconds += self.comm.pp_seconds(self.pp, num_tokens)
        return seconds

    def prefill_time(self, prompt_lens: list[int]) -> float:
        p = self.base.prefill
        total = sum(prompt_lens)
        work = p.b * total + p.c * sum(n * n for n in prompt_lens)
        return self._scaled(p.a, work, total)

    def decode_time(self, context_lens: list[int]) -> float:
        d = self.base.decode
        rows = len(context_lens)
        return self._scaled(d.a, d.b * sum(context_lens) + d.c * rows, rows)


def plan_of(model: LatencyModel) -> tuple[int, int]:
    return int(model.meta.get("tp", 1)), int(model.meta.get("pp", 1))


@dataclass
class LatencyModelSet:
    """Fitted latency models by (tp, pp)."""
    models: dict[tuple[int, int], LatencyModel] = field(default_factory=dict)

    @classmethod
    def load(cls, paths: list[str] | str) -> "LatencyModelSet":
        """From latency-model JSON files and/or directories of them (every *.json inside). Two files
        for one plan are an error (which one would be meant?)."""
        if isinstance(paths, str):
            paths = [paths]
        files: list[Path] = []
        for path in map(Path, paths):
            if path.is_dir():
                found = sorted(path.glob("*.json"))
                if not found:
                    raise ValueError(f"{path} holds no latency model (*.json written by `pdserve profile`)")
                files += found
            elif path.is_file():
                files.append(path)
            else:
                raise ValueError(f"latency model {path} does not exist: run `pdserve profile --model DIR "
                                 f"--out {path}` first")
        models: dict[tuple[int, int], LatencyModel] = {}
        for file in files:
            model = LatencyModel.load(str(file))
            plan = plan_of(model)
            if plan in models:
                raise ValueError(f"two latency models for tp={plan[0]} pp={plan[1]} ({file} and another); "
                                 "give one file per plan")
            models[plan] = model
        return cls(models)

    @property
    def plans(self) -> list[tuple[int, int]]:
        return sorted(self.models)

    def for_plan(self, tp: int, pp: int, comm: CommModel | None = None) -> tuple[LatencyModel | PlanLatency, str]:
        """The plan's step latency and where it comes from ("profiled", or "scaled from tpN")."""
        if not self.models:
            raise ValueError("no latency model given: pass --latency-model FILE (from `pdserve profile`)")
        if (tp, pp) in self.models:
            return self.models[(tp, pp)], "profiled"
        bases = [t for (t, p) in self.models if p == 1 and tp % t == 0]
        if not bases:
            raise ValueError(f"no profiled plan to scale tp={tp} pp={pp} from: profile a plan with pp=1 and a "
                             f"tp that divides {tp} (profiled: {self._names()})")
        base_tp = max(bases)
        return (PlanLatency(self.models[(base_tp, 1)], tp, pp, base_tp, comm),
                f"scaled from tp={base_tp} pp=1 (rule: scheduler/latency_plans.py)")

    def _names(self) -> str:
        return ", ".join(f"tp={t} pp={p}" for t, p in self.plans) or "none"

    @property
    def dtype(self) -> str | None:
        """The dtype the profiles ran in (the first that says)."""
        for model in self.models.values():
            if model.meta.get("dtype"):
                return str(model.meta["dtype"])
        return None


def save_set(models: list[LatencyModel], directory: str) -> list[str]:
    """Write one file per plan, named latency-tp{tp}-pp{pp}.json (what LatencyModelSet.load reads)."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for model in models:
        tp, pp = plan_of(model)
        path = out / f"latency-tp{tp}-pp{pp}.json"
        model.save(str(path))
        paths.append(str(path))
    return paths
