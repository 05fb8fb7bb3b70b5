"""Which GPUs the Ray launcher's processes see, on a local Ray cluster that declares GPUs this machine
does not have (Ray hands out their ids and sets CUDA_VISIBLE_DEVICES as on a GPU node; the engines
compute on CPU). rank 0 of a prefill or decode instance of several ranks maps each rank's KV cache by
CUDA IPC, so its actor sees every GPU of the node, its own first; every other actor sees its own only.
The CUDA path itself runs in tests/serving/test_gpu_paths.py (two GPUs)."""
from __future__ import annotations

import pytest

from serving.config import Config
from serving.launchers import make_specs
from serving.router.engine_client import build_disaggregated_client
from serving.runner.rank_hosts import RAY_NOSET_CUDA
from tests.serving.test_disagg_support import (LoopThread, assert_no_leaks, collect_all, make_cases,
                                               reference_outputs, tiny_config, token_ids, wait_until_drained)

ray = pytest.importorskip("ray", reason="the Ray launcher needs ray (a dependency of pdserve)")


def _options(config: Config) -> dict[str, dict]:
    from serving.launchers.ray import RayLauncher
    launcher = RayLauncher(config.deploy)  # connects to nothing until start()
    return {spec.name: launcher.actor_options(spec, None) for spec in make_specs(config)}


def test_only_the_actor_of_a_prefill_or_decode_instance_of_several_ranks_on_gpus_sees_every_gpu():
    gpus = {"launcher": "ray", "num_gpus_per_instance": 1}
    options = _options(Config.from_dict({"mode": "disaggregated", **gpus,
                                         "decode_overrides": {"pipeline_parallel_size": 2}}))
    assert options["decode-0"]["runtime_env"] == {"env_vars": {RAY_NOSET_CUDA: "1"}}
    assert options["decode-0"]["num_gpus"] == 1  # its own GPU is still Ray's to give
    assert "runtime_env" not in options["prefill-0"]  # one rank: its own GPU
    options = _options(Config.from_dict({"mode": "disaggregated", **gpus,
                                         "prefill_overrides": {"tensor_parallel_size": 2}}))
    assert RAY_NOSET_CUDA in options["prefill-0"]["runtime_env"]["env_vars"]
    # colocated ranks move no KV between processes; on CPU there is no GPU to see
    assert "runtime_env" not in _options(Config.from_dict({**gpus, "tensor_parallel_size": 2}))["replica-0"]
    cpu = Config.from_dict({"mode": "disaggregated", "launcher": "ray", "decode_overrides": {"tensor_parallel_size": 2}})
    assert "runtime_env" not in _options(cpu)["decode-0"]


@pytest.mark.slow
def test_a_decode_instance_of_two_ranks_on_ray_gpus_sees_the_nodes_gpus_its_own_first(tiny_model_dir, monkeypatch):
    """prefill TP=1 and decode TP=2, one GPU per rank, on a node of three GPUs that its raylet was
    started to see as 5, 6, 7 (CUDA_VISIBLE_DEVICES): decode-0's actor (rank 0) sees all three, its own
    first; prefill-0's and a rank actor's see their own; output equals colocated."""
    assert not ray.is_initialized()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6,7")  # the raylet and its workers inherit it
    ray.init(num_cpus=4, num_gpus=3, include_dashboard=False)  # the launcher keeps this connection
    loop = LoopThread()
    try:
        config = tiny_config(tiny_model_dir, mode="disaggregated", launcher="ray", device="cpu",
                             num_gpus_per_instance=1, decode_overrides={"tensor_parallel_size": 2})
        client = build_disaggregated_client(config)
        try:
            cases = make_cases("ray-gpus", 17, [12, 40], [8])
            expected = reference_outputs(tiny_config(tiny_model_dir), cases)
            got = loop.run(collect_all(client, cases))
            for case in cases:
                assert token_ids(got[case.request_id]) == token_ids(expected[case.request_id])
            decode = client._launcher.visible_gpus("decode-0").split(",")
            prefill = client._launcher.visible_gpus("prefill-0").split(",")
            assert sorted(decode) == ["5", "6", "7"]
            assert len(prefill) == 1 and prefill[0] != decode[0]  # each its own GPU (Ray's)
            assert ray.available_resources().get("GPU", 0) == 0  # prefill 1, decode's two ranks 1 each
            assert_no_leaks(loop.run(wait_until_drained(client)))
        finally:
            loop.run(client.shutdown())

        # a rank actor (RankHost) as an engine starts one, in bundle 1 of its instance's group
        from ray.util.placement_group import placement_group, remove_placement_group
        from serving.runner.rank_hosts import RayRanks
        group = placement_group([{"CPU": 1, "GPU": 1}] * 2, strategy="STRICT_PACK", name="pdserve-test-ranks")
        ray.get(group.ready(), timeout=60)
        try:
            rank = RayRanks("pdserve-test-ranks", None).actor(1)
            _, visible = ray.get(rank.describe.remote(), timeout=60)
            assert visible is not None and len(visible.split(",")) == 1  # its own GPU, cuda:0 to it
            ray.kill(rank)
        finally:
            remove_placement_group(group)
    finally:
        loop.close()
        ray.shutdown()
