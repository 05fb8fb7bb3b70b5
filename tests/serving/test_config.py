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
