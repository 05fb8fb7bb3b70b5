"""Side-by-side systems: how each is described, launched and waited for."""
import subprocess
import sys

import pytest

from bench.systems import (RunningSystem, SystemSpec, free_port, launch_command, load_systems,
                           pdserve_executable, systems_from_names, wait_ready)


def test_launch_commands():
    pdserve = pdserve_executable()
    argv, env = launch_command(SystemSpec("c", "pdserve", model="/m", max_model_len=256), 4321)
    assert argv == [*pdserve, "serve", "--model", "/m", "--port", "4321", "--max-model-len", "256"]
    assert env == {}
    argv, _ = launch_command(SystemSpec("d", "pdserve", model="/m", mode="disaggregated", num_prefill=2,
                                        num_decode=1, extra_args=("--seed", "3")), 5)
    assert argv == [*pdserve, "serve", "--model", "/m", "--port", "5", "--mode", "disaggregated",
                    "--num-prefill", "2", "--num-decode", "1", "--seed", "3"]
    argv, env = launch_command(SystemSpec("v", "vllm", model="/m", venv="/venvs/vllm", max_model_len=512,
                                          kv_cache_space_gib=2), 7)
    assert argv == ["/venvs/vllm/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m",
                    "--dtype", "float32", "--enforce-eager", "--host", "127.0.0.1", "--port", "7",
                    "--max-model-len", "512"]
    assert env == {"VLLM_CPU_KVCACHE_SPACE": "2"}


def test_devices_per_system():
    assert SystemSpec("c", "pdserve", model="/m").devices == 1
    assert SystemSpec("d", "pdserve", model="/m", mode="disaggregated", num_prefill=2, num_decode=3).devices == 5
    assert SystemSpec("v", "vllm", model="/m", venv="/v", num_devices=2).devices == 2


def test_systems_from_yaml_and_names(tmp_path):
    path = tmp_path / "systems.yaml"
    path.write_text("model: /models/small\nsystems:\n"
                    "  - {name: colo, kind: pdserve}\n"
                    "  - {name: dis, kind: pdserve, mode: disaggregated, extra_args: [--seed, 1]}\n"
                    "  - {name: ext, kind: url, url: 'http://127.0.0.1:9000'}\n")
    colo, dis, ext = load_systems(str(path))
    assert (colo.model, dis.mode, dis.extra_args, ext.url) == ("/models/small", "disaggregated",
                                                                ("--seed", "1"), "http://127.0.0.1:9000")
    path.write_text("systems:\n  - {name: x, kind: pdserve, model: /m, gpu: 1}\n")
    with pytest.raises(ValueError, match="unknown key"):
        load_systems(str(path))
    names = systems_from_names(["pdserve-colocated", "pdserve-disaggregated"], "/m", None, 128,
                               ["other=http://127.0.0.1:9"])
    assert [(s.name, s.kind, s.mode) for s in names] == [
        ("pdserve-colocated", "pdserve", "colocated"), ("pdserve-disaggregated", "pdserve", "disaggregated"),
        ("other", "url", "colocated")]
    with pytest.raises(ValueError, match="--vllm-venv"):
        systems_from_names(["vllm"], "/m", None, None, [])
    with pytest.raises(ValueError, match="NAME=URL"):
        systems_from_names([], "/m", None, None, ["http://127.0.0.1:9"])


def test_url_system_is_not_started(tmp_path):
    with RunningSystem(SystemSpec("ext", "url", url="http://127.0.0.1:9/"), tmp_path) as base_url:
        assert base_url == "http://127.0.0.1:9"


def test_wait_ready_reports_a_server_that_died(tmp_path):
    log = tmp_path / "server.log"
    log.write_text("Traceback: model directory not found\n")
    process = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(3)"])
    process.wait()
    with pytest.raises(RuntimeError, match="exited with code 3(.|\n)*model directory not found"):
        wait_ready(f"http://127.0.0.1:{free_port()}", process, 30.0, log)


def test_wait_ready_times_out_with_advice(tmp_path):
    with pytest.raises(RuntimeError, match="did not answer /health or /v1/models within 0.2 s"):
        wait_ready(f"http://127.0.0.1:{free_port()}", None, 0.2, tmp_path / "absent.log")


def test_group_cpu_seconds_counts_the_whole_process_group():
    """A server's processes are one process group (started in a session of its own): the CPU a child
    of its leader burns is counted, and another group's is not."""
    import subprocess
    import sys
    import time
    from bench.processes import group_cpu_seconds
    burn = ("import subprocess, sys; subprocess.run([sys.executable, '-c', "
            "'import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.3: pass']); "
            "import time; time.sleep(60)")
    leader = subprocess.Popen([sys.executable, "-c", burn], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while group_cpu_seconds(leader.pid) < 0.3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert group_cpu_seconds(leader.pid) >= 0.3  # the reaped child's CPU, through the leader's cutime
        assert group_cpu_seconds(leader.pid) < 30
        assert group_cpu_seconds(2 ** 22 + 7) == 0.0  # no such group
    finally:
        leader.kill()
        leader.wait()
