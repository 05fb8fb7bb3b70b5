import pytest

from serving.cli import add_serve_args, config_from_args
from serving.config import Config


def parse(argv):
    import argparse
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    return config_from_args(parser.parse_args(argv))


def test_defaults_are_safe():
    config = Config()
    assert config.server.host == "127.0.0.1"
    assert config.server.api_key is None
    assert config.deploy.internal_host == "127.0.0.1"


def test_yaml_flat_and_grouped_keys_and_cli_wins(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("max-num-seqs: 7\nkv_cache_memory_bytes: 64MiB\nserver:\n  port: 9001\n"
                    "deploy:\n  mode: disaggregated\n  num-decode: 2\n")
    config = parse(["--config", str(path), "--port", "9002", "--block-size", "8"])
    assert config.scheduler.max_num_seqs == 7
    assert config.cache.kv_cache_memory_bytes == 64 * 1024**2
    assert config.cache.block_size == 8
    assert config.server.port == 9002  # the command line wins over the file
    assert config.deploy.mode == "disaggregated" and config.deploy.num_decode == 2


def test_positional_model_and_vllm_flag_names():
    config = parse(["/models/x", "--max-model-len", "512", "--num-gpu-blocks-override", "33",
                    "--no-enable-prefix-caching", "--max-num-batched-tokens", "256"])
    assert config.model.model == "/models/x"
    assert config.model.max_model_len == 512
    assert config.cache.num_blocks_override == 33
    assert config.cache.enable_prefix_caching is False
    assert config.scheduler.max_num_batched_tokens == 256


def test_shutdown_and_read_deadline_flags(tmp_path):
    assert parse(["--shutdown-timeout", "0"]).server.shutdown_timeout_s == 0  # vLLM's name
    config = parse(["--shutdown-timeout-s", "45", "--request-header-timeout-s", "2",
                    "--request-body-timeout-s", "3.5"])
    assert (config.server.shutdown_timeout_s, config.server.request_header_timeout_s,
            config.server.request_body_timeout_s) == (45, 2, 3.5)
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  shutdown-timeout: 12\n")
    assert Config.load(str(path)).server.shutdown_timeout_s == 12


@pytest.mark.parametrize("yaml_text, message", [
    ("max_num_seqz: 3\n", "unknown config key"),
    ("block_size: 3\n", "--block-size"),
    ("max_num_seqs: 0\n", "--max-num-seqs"),
    ("mode: sideways\n", "--mode"),
    ("kv_cache_memory_bytes: lots\n", "size"),
    ("shutdown_timeout: -1\n", "--shutdown-timeout"),
    ("request_header_timeout_s: 0\n", "--request-header-timeout-s"),
    ("- a\n- b\n", "mapping"),
])
def test_bad_config_says_what_to_change(tmp_path, yaml_text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ValueError, match=message):
        Config.load(str(path))


def test_cli_reports_config_errors_without_traceback(capsys):
    from serving.cli import main
    assert main(["serve", "--max-num-seqs", "0"]) == 2
    assert "--max-num-seqs must be at least 1" in capsys.readouterr().err


@pytest.fixture(scope="module")
def long_context_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with an 8192-token context, so that --max-model-len 4096 is one it supports."""
    import json
    import shutil
    path = tmp_path_factory.mktemp("models") / "tiny-8k"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = 8192
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_cli_refuses_a_kv_pool_smaller_than_one_sequence(capsys, monkeypatch, long_context_model_dir, mode):
    # disaggregated: refused before any instance starts, not reported as "instance X exited"
    import serving.api.server
    import serving.router.engine_client
    from serving.cli import main

    def must_not_run(*args, **kwargs):  # a regression fails here instead of serving for ever
        raise AssertionError("pdserve serve went on to launch instances or serve")
    monkeypatch.setattr(serving.router.engine_client, "build_disaggregated_client", must_not_run)
    monkeypatch.setattr(serving.api.server, "run_server", must_not_run)
    argv = ["serve", "--model", long_context_model_dir, "--mode", mode, "--num-gpu-blocks-override", "4",
            "--max-model-len", "4096"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("pdserve: error: ") and "Traceback" not in err
    assert "max seq len (4096)" in err and "(64: 4 blocks of 16 tokens)" in err
    assert "--num-gpu-blocks-override" in err and "--max-model-len to at most 64" in err


def test_per_role_tensor_parallel_flags_land_in_the_role_sections():
    config = parse(["--mode", "disaggregated", "--prefill-tp", "2", "--decode-tp", "1"])
    assert config.deploy.prefill_overrides == {"tensor_parallel_size": 2}
    assert config.deploy.decode_overrides == {"tensor_parallel_size": 1}
    from serving.launchers import make_specs
    specs = make_specs(config)
    assert [(s.role, s.config.parallel.tensor_parallel_size) for s in specs] == [("prefill", 2), ("decode", 1)]


def test_thread_binding_is_refused_with_tensor_parallel_ranks():
    for flag in ("--tensor-parallel-size", "--pipeline-parallel-size"):
        with pytest.raises(ValueError, match="or --pipeline-parallel-size above 1 each rank is a process of its own"):
            parse([flag, "2", "--cpu-threads-bind", "auto"])
    assert parse(["--tensor-parallel-size", "2"]).deploy.cpu_threads_bind == "nobind"
