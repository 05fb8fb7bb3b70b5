"""Launchers start instance processes and start them again when they die (see base.py)."""
from __future__ import annotations

from serving.config import Config
from serving.launchers.base import LaunchedInstance, Launcher, make_specs, stop_budget_s
from serving.launchers.local import LocalLauncher

__all__ = ["LaunchedInstance", "Launcher", "LocalLauncher", "make_specs", "make_launcher"]


def make_launcher(config: Config) -> Launcher:
    if config.deploy.launcher == "ray":
        from serving.launchers.ray import RayLauncher
        return RayLauncher(config.deploy, stop_budget_s=stop_budget_s(config))
    return LocalLauncher(config.deploy.instance_start_timeout_s, stop_budget_s=stop_budget_s(config))
