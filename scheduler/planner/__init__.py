"""The placement planner (DistServe's two-level search, judged by simulated goodput per device): the
cluster description, model sizing, placement, the search and bottleneck attribution."""
from scheduler.planner.cluster import ClusterSpec
from scheduler.planner.instances import InstancePlan, ModelSetup
from scheduler.planner.search import Planner, PlannerResult, PlannerSettings, Unit
from scheduler.planner.sizing import ModelShape

__all__ = ["ClusterSpec", "ModelShape", "ModelSetup", "InstancePlan", "Planner", "PlannerSettings",
           "PlannerResult", "Unit"]
