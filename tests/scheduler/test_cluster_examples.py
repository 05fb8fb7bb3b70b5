"""The example cluster descriptions in deploy/clusters/ are valid (what `pdserve plan --cluster` reads)."""
import glob
import os

import pytest
import yaml

from scheduler.planner import ClusterSpec

CLUSTERS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "clusters", "*.yaml")))


@pytest.mark.parametrize("path", CLUSTERS)
def test_example_clusters_load(path):
    with open(path) as f:
        cluster = ClusterSpec.from_dict(yaml.safe_load(f), where=path)
    assert cluster.num_devices >= 1


def test_the_examples_are_there():
    assert {os.path.basename(p) for p in CLUSTERS} >= {"example.yaml", "cpu.yaml"}
