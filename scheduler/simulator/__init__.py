"""The simulator: a discrete-event simulation of a deployment (colocated replicas, or prefill and
decode instances) that runs the runtime's scheduler, KV manager, policies, connector policies and
routing policy through the latency-model executor on virtual clocks. See simulator.py for the event
model and transfer.py for KV transfer timing."""
from scheduler.simulator.simulator import InstanceStats, SimResult, Simulator, simulate
from scheduler.simulator.spec import (LinkSpec, SimConversation, SimDeployment, SimInstanceSpec, SimRecord,
                                      SimTurn)

__all__ = ["Simulator", "simulate", "SimResult", "InstanceStats", "SimDeployment", "SimInstanceSpec", "LinkSpec",
           "SimConversation", "SimTurn", "SimRecord"]
