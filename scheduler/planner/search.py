"""The placement planner: DistServe's two-level search, every candidate judged by simulated goodput.

Level 1, per phase and per TP x PP plan that fits the model (scheduler/planner/instances.py): one
instance simulated alone — prefill with an ideal decode side (TTFT SLO), decode with each prompt's KV
handed over at once (TPOT SLO), a colocated replica (both SLOs) — bisected for its goodput.

Level 2, units: the top-k prefill plans x the top-k decode plans, each with the instance counts
n_p : n_d whose level-1 goodputs balance (n_p·g_p ≈ n_d·g_d, a few roundings), under the placement
(same node: both phases share pp and a unit fits one node's devices). Each unit is simulated whole —
routing, KV reservation, transfers on the placement's links, both SLOs jointly, errors as misses — and
bisected for its goodput per device. A colocated candidate is one replica (level 1 already judged it
jointly); replicas behind the router scale per device.

The best unit is replicated to fill the cluster, or to serve `request_rate`; the whole deployment is
simulated once at the rate the units should sustain, to check. Every probe also records where the
plan breaks (scheduler/planner/attribution.py) and how busy each role was.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from scheduler.config import SchedulerConfig
from scheduler.planner.attribution import attribute
from scheduler.planner.instances import GoodputResult, InstancePlan, ModelSetup, Probe, find_goodput
from scheduler.planner.placement import ANYWHERE, SAME_NODE, PlacementChoice, choose_placement, pack_first_fit
from scheduler.simulator import LinkSpec, SimConversation, SimDeployment, SimRecord, Simulator

Workload = Callable[[float, int], list[SimConversation]]  # (rate, number of requests) -> conversations
Attainment = Callable[[list[SimRecord]], float]  # fraction of requests meeting every SLO


@dataclass(frozen=True)
class PlannerSettings:
    ttft_slo_s: float
    tpot_slo_s: float
    target: float = 0.9
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    num_requests: int = 400  # per simulated probe of one instance (units get more, scaled by size)
    verify_requests: int = 10_000  # the check of the whole deployment
    request_rate: float | None = None  # size the deployment for this rate (None: fill the cluster)
    tp_sizes: tuple[int, ...] = (1, 2, 4, 8)
    pp_sizes: tuple[int, ...] = (1, 2, 4)
    top_k: int = 2
    max_instances_per_role: int = 8  # in one unit
    rel_tol: float = 0.05
    max_probes: int = 8
    transfer_share: float = 0.1  # placement: same node when a cross-node transfer costs more than this
    include_colocated: bool = True
    include_disaggregated: bool = True

    def __post_init__(self) -> None:
        if not (self.ttft_slo_s > 0 and self.tpot_slo_s > 0):
            raise ValueError("the planner needs both SLOs: --goodput ttft:MS tpot:MS")
        if not 0 < self.target <= 1:
            raise ValueError(f"target attainment must be in (0, 1], got {self.target}")


@dataclass
class PhaseScore:
    plan: InstancePlan
    goodput: GoodputResult

    @property
    def per_device(self) -> float:
        return self.goodput.rate / self.plan.num_devices


@dataclass
class Unit:
    """A candidate: n_p prefill + n_d decode instances, or one colocated replica."""
    kind: str  # "colocated" or "disaggregated"
    plans: tuple[InstancePlan, ...]  # colocated: (replica,); disaggregated: (prefill, decode)
    counts: tuple[int, ...]  # instances of each plan
    placement: str
    goodput: GoodputResult | None = None

    @property
    def num_devices(self) -> int:
        return sum(p.num_devices * n for p, n in zip(self.plans, self.counts))

    @property
    def per_device(self) -> float:
        return self.goodput.rate / self.num_devices if self.goodput else 0.0

    @property
    def label(self) -> str:
        if self.kind == "colocated":
            return f"colocated {self.plans[0].label}"
        (p, d), (n_p, n_d) = self.plans, self.counts
        return f"{n_p}x prefill {p.label} + {n_d}x decode {d.label}"


@dataclass
class PlannerResult:
    best: Unit
    units: list[Unit]  # every candidate simulated, best first
    phases: dict[str, list[PhaseScore]]  # role -> level-1 scores, best first
    skipped: dict[str, str]  # plan -> why it cannot run
    placement: PlacementChoice
    num_units: int
    verify_rate: float
    verify_attainment: float
    verify_wall_s: float
    verify_num_requests: int
    search_wall_s: float = 0.0
    num_simulations: int = 0

    @property
    def num_devices(self) -> int:
        return self.best.num_devices * self.num_units


class Planner:
    def __init__(self, setup: ModelSetup, settings: PlannerSettings, workload: Workload, attainment: Attainment,
                 progress: Callable[[str], None] | None = None) -> None:
        self.setup = setup
        self.settings = settings
        self.workload = workload
        self.attainment = attainment
        self.progress = progress or (lambda message: None)
        self.num_simulations = 0
        self.skipped: dict[str, str] = {}
        base = workload(1.0, settings.num_requests)
        self.mean_prompt = sum(c.turns[0].num_input_tokens for c in base) / len(base)
        self.mean_output = sum(c.turns[0].num_output_tokens for c in base) / len(base)

    # ---- the search ----
    def plan(self) -> PlannerResult:
        started = time.perf_counter()
        s = self.settings
        placement = self._placement()
        phases = {role: self._level1(role) for role in self._roles()}
        units = [Unit("colocated", (score.plan,), (1,), ANYWHERE, score.goodput) for score in phases.get("colocated", [])]
        if s.include_disaggregated and phases.get("prefill") and phases.get("decode"):
            for unit in self._candidate_units(phases["prefill"], phases["decode"], placement):
                self.progress(f"unit {unit.label}")
                unit.goodput = self._bisect(self._deployment_of(unit, 1, placement), self._unit_estimate(unit, phases),
                                            unit.kind == "colocated", len(self._unit_instances(unit)))
                units.append(unit)
        if not units:
            raise ValueError(self._no_plan_message())
        units.sort(key=lambda u: -u.per_device)
        best = units[0]
        if best.per_device <= 0:
            raise ValueError(self._no_plan_message(units))
        num_units = self._num_units(best, placement)
        rate, attainment, wall, n = self._verify(best, num_units, placement)
        return PlannerResult(best, units, phases, self.skipped, placement, num_units, rate, attainment, wall, n,
                             time.perf_counter() - started, self.num_simulations)

    def _roles(self) -> list[str]:
        roles = []
        if self.settings.include_colocated:
            roles.append("colocated")
        if self.settings.include_disaggregated:
            roles += ["prefill", "decode"]
        return roles

    def _placement(self) -> PlacementChoice:
        setup = self.setup
        tp, pp = setup.latency.plans[0]  # the smallest profiled plan, as it was profiled
        prefill_s = setup.latency.for_plan(tp, pp)[0].prefill_time([round(self.mean_prompt)])
        return choose_placement(setup.cluster, self.mean_prompt, setup.shape.kv_bytes_per_token(setup.dtype),
                                prefill_s, self.settings.transfer_share)

    def _level1(self, role: str) -> list[PhaseScore]:
        scores = []
        for tp in self.settings.tp_sizes:
            for pp in self.settings.pp_sizes:
                plan = self.setup.instance_plan(role, tp, pp, self.settings.scheduler)
                if isinstance(plan, str):
                    self.skipped[f"{role} tp{tp}pp{pp}"] = plan
                    continue
                self.progress(f"{role} tp{tp}pp{pp}")
                phase = "both" if role == "colocated" else role
                deployment = SimDeployment((self.setup.spec(f"{role}-0", plan),), self._links(), phase=phase)
                goodput = self._bisect(deployment, self._estimate(plan), role == "colocated", 1)
                scores.append(PhaseScore(plan, goodput))
        scores.sort(key=lambda score: -score.per_device)
        return scores

    # ---- level 2 ----
    def _candidate_units(self, prefills: list[PhaseScore], decodes: list[PhaseScore],
                         placement: PlacementChoice) -> list[Unit]:
        """For each pair of plans, the two instance counts (n_p, n_d) with the best estimated goodput
        per device among those whose level-1 goodputs balance (n_d = n_p x ratio, rounded both ways)."""
        units, seen = [], set()
        limit = self.settings.max_instances_per_role
        for p, d in self._pairs(prefills, decodes, placement):
            if p.goodput.rate <= 0 or d.goodput.rate <= 0:
                continue
            ratio = p.goodput.rate / d.goodput.rate  # decode instances per prefill instance
            options = {(n_p, n_d) for n_p in range(1, limit + 1)
                       for n_d in (max(1, math.floor(n_p * ratio)), max(1, math.ceil(n_p * ratio))) if n_d <= limit}

            def estimate(counts: tuple[int, int]) -> float:
                n_p, n_d = counts
                return (min(n_p * p.goodput.rate, n_d * d.goodput.rate)
                        / (n_p * p.plan.num_devices + n_d * d.plan.num_devices))

            kept = 0
            for n_p, n_d in sorted(options, key=lambda c: (-estimate(c), c)):
                key = (p.plan.label, d.plan.label, n_p, n_d)
                unit = Unit("disaggregated", (p.plan, d.plan), (n_p, n_d), placement.placement)
                if key in seen or not self._fits(unit, placement):
                    continue
                seen.add(key)
                units.append(unit)
                kept += 1
                if kept == 2:
                    break
        return units

    def _pairs(self, prefills: list[PhaseScore], decodes: list[PhaseScore],
               placement: PlacementChoice) -> list[tuple[PhaseScore, PhaseScore]]:
        """The top-k plans of each phase, paired; under same-node placement the top-k of each pp
        (a unit's prefill and decode segments must line up stage by stage)."""
        k = self.settings.top_k
        groups = [(prefills, decodes)] if placement.placement != SAME_NODE else [
            ([s for s in prefills if s.plan.pp == pp], [s for s in decodes if s.plan.pp == pp])
            for pp in sorted({s.plan.pp for s in prefills} & {s.plan.pp for s in decodes})]
        pairs = []
        for group_p, group_d in groups:
            # best ranks first; only pairs whose smallest unit (1 + 1 instances) fits the cluster
            ranked = sorted(((i + j, i, j) for i in range(len(group_p)) for j in range(len(group_d))))
            fitting = [(group_p[i], group_d[j]) for _, i, j in ranked
                       if self._fits(Unit("disaggregated", (group_p[i].plan, group_d[j].plan), (1, 1),
                                          placement.placement), placement)]
            pairs += fitting[:k * k]
        return pairs

    def _fits(self, unit: Unit, placement: PlacementChoice) -> bool:
        cluster = self.setup.cluster
        if unit.num_devices > cluster.num_devices:
            return False
        if placement.placement != SAME_NODE:
            return True
        (p, d), (n_p, n_d) = unit.plans, unit.counts
        return p.pp == d.pp and n_p * p.tp + n_d * d.tp <= cluster.devices_per_node

    def _unit_estimate(self, unit: Unit, phases: dict[str, list[PhaseScore]]) -> float:
        rates = {(s.plan.role, s.plan.label): s.goodput.rate for scores in phases.values() for s in scores}
        return min(rates[(p.role, p.label)] * n for p, n in zip(unit.plans, unit.counts))

    # ---- simulation ----
    def _links(self) -> LinkSpec:
        cluster = self.setup.cluster
        return LinkSpec(cluster.intra_node_bytes_per_s, cluster.inter_node_bytes_per_s,
                        cluster.transfer_latency_ms / 1e3)

    def _unit_instances(self, unit: Unit) -> list[InstancePlan]:
        return [plan for plan, count in zip(unit.plans, unit.counts) for _ in range(count)]

    def _deployment_of(self, unit: Unit, num_units: int, placement: PlacementChoice) -> SimDeployment:
        plans = self._unit_instances(unit) * num_units
        plans.sort(key=lambda plan: ("colocated", "prefill", "decode").index(plan.role))
        if placement.placement == SAME_NODE and unit.kind == "disaggregated":
            nodes = self._same_node_nodes(unit, num_units)
        else:
            nodes = pack_first_fit([plan.num_devices for plan in plans], self.setup.cluster)
        counters: dict[str, int] = {}
        specs = []
        for plan, node in zip(plans, nodes):
            index = counters[plan.role] = counters.get(plan.role, -1) + 1
            name = f"replica-{index}" if plan.role == "colocated" else f"{plan.role}-{index}"
            specs.append(self.setup.spec(name, plan, node))
        return SimDeployment(tuple(specs), self._links())

    def _units_per_node_group(self, unit: Unit) -> int:
        """Same-node placement: a unit takes pp nodes (one per stage) and, on each, the tp of every
        instance; this many units share one group of pp nodes."""
        per_stage = sum(plan.tp * n for plan, n in zip(unit.plans, unit.counts))
        return self.setup.cluster.devices_per_node // per_stage

    def _same_node_nodes(self, unit: Unit, num_units: int) -> list[int]:
        """The first node of each instance (prefills first, then decodes, as the deployment lists
        them): unit u lives on node group u // units_per_group, of pp nodes."""
        stages, per_group = unit.plans[0].pp, self._units_per_node_group(unit)
        n_p, n_d = unit.counts
        node = [(u // per_group) * stages for u in range(num_units)]
        return [node[u] for u in range(num_units) for _ in range(n_p)] + \
               [node[u] for u in range(num_units) for _ in range(n_d)]

    def _bisect(self, deployment: SimDeployment, estimate: float, colocated: bool,
                num_instances: int) -> GoodputResult:
        s = self.settings
        num_requests = s.num_requests * max(1, min(4, math.ceil(num_instances / 2)))
        phase = deployment.phase
        ttft = s.ttft_slo_s if phase in ("both", "prefill") else None
        tpot = s.tpot_slo_s if phase in ("both", "decode") else None

        def measure(rate: float) -> Probe:
            result = Simulator(deployment).run(self.workload(rate, num_requests))
            self.num_simulations += 1
            records = result.records
            if phase != "both":  # one phase alone: only its own SLO counts
                records = [_only_phase(r, phase) for r in records]
            attainment = self.attainment(records)
            busy: dict[str, list[float]] = {}
            for stats in result.instances.values():
                busy.setdefault(stats.role, []).append(stats.busy_seconds / max(result.duration_s, 1e-9))
            utilization = {role: sum(v) / len(v) for role, v in busy.items()}
            return Probe(rate, attainment, attribute(result.records, ttft, tpot, colocated).describe(), utilization)

        return find_goodput(measure, estimate, s.target, s.rel_tol, s.max_probes)

    def _estimate(self, plan: InstancePlan) -> float:
        """A first rate to probe: what the plan could sustain by the latency model alone (no queueing)."""
        prompt, output = round(self.mean_prompt), max(1, round(self.mean_output))
        prefill_rate = 1.0 / max(plan.latency.prefill_time([prompt]), 1e-9)
        context = prompt + output // 2
        batch = max(1, min(plan.scheduler.max_num_seqs, plan.num_blocks * self.setup.block_size // (prompt + output)))
        while batch > 1 and plan.latency.decode_time([context] * batch) > self.settings.tpot_slo_s:
            batch //= 2
        decode_rate = batch / max(plan.latency.decode_time([context] * batch), 1e-9) / output
        rates = {"prefill": prefill_rate, "decode": decode_rate,
                 "colocated": 1.0 / (1.0 / prefill_rate + 1.0 / decode_rate)}
        return 0.7 * rates[plan.role]

    def _num_units(self, best: Unit, placement: PlacementChoice) -> int:
        cluster = self.setup.cluster
        if placement.placement == SAME_NODE and best.kind == "disaggregated":
            fit = (cluster.nodes // best.plans[0].pp) * self._units_per_node_group(best)
        else:
            fit = cluster.num_devices // best.num_devices
        if self.settings.request_rate is None:
            return max(1, fit)
        needed = math.ceil(self.settings.request_rate / best.goodput.rate)
        if needed > fit:
            raise ValueError(f"the cluster cannot serve {self.settings.request_rate:g} req/s within the SLOs: the best "
                             f"plan ({best.label}) sustains {best.goodput.rate:.3g} req/s per unit of "
                             f"{best.num_devices} devices and {fit} unit(s) fit; add nodes or relax the SLOs")
        return needed

    def _verify(self, best: Unit, num_units: int, placement: PlacementChoice) -> tuple[float, float, float, int]:
        """Simulate the whole deployment at the rate its units should sustain (or the requested rate);
        when it misses the target, step the rate down 5% at a time (at most 3 more runs): replicas
        behind a router do not always add up exactly. Returns (rate, attainment, wall s, requests)."""
        deployment = self._deployment_of(best, num_units, placement)
        fixed = self.settings.request_rate
        rate = fixed if fixed is not None else best.goodput.rate * num_units
        per_unit = self.settings.num_requests * max(1, min(4, math.ceil(sum(best.counts) / 2)))
        num_requests = max(per_unit, min(self.settings.verify_requests, per_unit * num_units))
        wall = 0.0
        for attempt in range(4):
            self.progress(f"check: {len(deployment.instances)} instances at {rate:.3g} req/s")
            result = Simulator(deployment).run(self.workload(rate, num_requests))
            self.num_simulations += 1
            wall += result.wall_s
            attainment = self.attainment(result.records)
            if attainment >= self.settings.target or fixed is not None or attempt == 3:
                return rate, attainment, wall, num_requests
            rate *= 0.95
        raise AssertionError("unreachable")

    def _no_plan_message(self, units: list[Unit] | None = None) -> str:
        if not units:
            reasons = "; ".join(f"{plan}: {why}" for plan, why in list(self.skipped.items())[:6])
            return (f"no parallel plan can run {self.setup.shape.name} on this cluster ({reasons}): use devices "
                    f"with more memory, more devices per node, or a smaller model")
        best = max(units, key=lambda u: u.goodput.probes[0].attainment if u.goodput.probes else 0)
        lowest = min((p for p in best.goodput.probes), key=lambda p: p.rate)
        return (f"no plan meets the SLOs (TTFT {1e3 * self.settings.ttft_slo_s:g} ms, TPOT "
                f"{1e3 * self.settings.tpot_slo_s:g} ms) for {100 * self.settings.target:g}% of requests even at "
                f"{lowest.rate:.3g} req/s: the best, {best.label}, reaches {100 * lowest.attainment:.0f}% there "
                f"({lowest.bottleneck}); relax the SLOs (--goodput) or use faster devices")


def _only_phase(record: SimRecord, phase: str) -> SimRecord:
    """A phase simulated alone is judged on its own SLO: prefill keeps the first token only (TPOT 0);
    decode starts its clock when the KV lands (TTFT 0)."""
    if not record.success:
        return record
    copy = SimRecord(**vars(record))
    if phase == "prefill":
        copy.token_times_s = record.token_times_s[:1]
    else:
        copy.start_s = record.token_times_s[0]
    return copy
