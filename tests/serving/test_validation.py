"""The engine's own checks (serving/engine/validation.py), as functions and where the engine calls
them: on admission (stop token ids) and at start (the KV pool holds one max-length sequence)."""
from __future__ import annotations

import pytest

from scheduler.sampling_params import SamplingParams
from serving.config import Config
from serving.engine.engine import build_engine
from serving.engine.protocol import RequestRejectedError
from serving.engine.validation import check_kv_pool_fits, check_stop_token_ids


def test_stop_token_ids_must_be_inside_the_vocabulary():
    check_stop_token_ids([], 100)
    check_stop_token_ids([0, 99], 100)
    for bad in (100, -1, 2**40):
        with pytest.raises(RequestRejectedError, match=rf"stop_token_ids contains {bad}, .*0\.\.99"):
            check_stop_token_ids([5, bad], 100)


def test_kv_pool_must_hold_one_max_length_sequence():
    check_kv_pool_fits(num_blocks=128, block_size=16, max_model_len=2048)
    with pytest.raises(ValueError) as error:
        check_kv_pool_fits(num_blocks=127, block_size=16, max_model_len=2048)
    message = str(error.value)
    assert "max seq len (2048)" in message and "(2032: 127 blocks of 16 tokens)" in message
    for flag in ("--kv-cache-memory-bytes", "--num-gpu-blocks-override", "--max-model-len"):
        assert flag in message


@pytest.fixture(scope="module")
def core(tiny_model_dir):
    return build_engine(Config().replace(model=tiny_model_dir, block_size=4, num_blocks_override=64,
                                         max_model_len=256))


@pytest.mark.parametrize("stop_token_ids", [[2048], [-1], [3, 2**40]])
def test_engine_rejects_stop_token_ids_outside_the_vocabulary(core, stop_token_ids):
    assert core.vocab_size == 2048
    params = SamplingParams(temperature=0.0, max_tokens=4, stop_token_ids=stop_token_ids)
    with pytest.raises(RequestRejectedError, match=r"stop_token_ids contains .*valid ids are 0\.\.2047"):
        core.add_request("bad-stop", [5, 6, 7], params)
    assert not core.has_unfinished()
    core.check_integrity()
    core.add_request("fine", [5, 6, 7], params.clone(stop_token_ids=[2047]))  # and it keeps serving
    while core.has_unfinished():
        core.step()
    core.check_integrity()


def test_engine_refuses_to_start_with_a_pool_smaller_than_one_sequence(tiny_model_dir):
    config = Config().replace(model=tiny_model_dir, block_size=16, num_blocks_override=4, max_model_len=1024)
    with pytest.raises(ValueError, match=r"max seq len \(1024\) is larger .* \(64: 4 blocks of 16 tokens\)"):
        build_engine(config)
    build_engine(config.replace(max_model_len=64))  # exactly one sequence fits
