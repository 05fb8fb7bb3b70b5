"""The built-in model generator: deterministic, loadable by transformers and by pdserve alike."""
import hashlib
import os
import subprocess
import sys

import pytest
import torch
import transformers

from serving.models import ModelArchConfig, load_model
from serving.models import default_model
from serving.models.make_model import MODEL_SIZES, main, make_model
from tests.serving.test_models import dense_causal_attention

PROMPTS = ["Hello, my name is", "The quick brown fox jumps over", "def foo(x):\n    return x + 1",
           "1 + 2 = 3, 40 + 5 =", "Beautiful is better than ugly."]
ROUND_TRIP_TEXTS = [
    "Hello world!", "  two leading spaces and trailing  ", "tabs\tand\nnew\n\nlines\r\n",
    "déjà vu, naïve café — 日本語 and emoji 🤖👍", "def f(x):\n    return {'a': [1, 2.5e-3]}",
    "<|eot_id|> looks special but is plain text here", "",
]


def _digests(model_dir) -> dict[str, str]:
    return {name: hashlib.sha256(open(os.path.join(model_dir, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(model_dir))}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_model("tiny", str(tmp_path_factory.mktemp("models") / "tiny"), seed=0)


@pytest.fixture(scope="module")
def hf_tiny(tiny_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    return tokenizer, model


def test_files_are_standard_hf_layout(tiny_dir):
    assert sorted(os.listdir(tiny_dir)) == ["config.json", "generation_config.json", "model.safetensors",
                                            "tokenizer.json", "tokenizer_config.json"]


def test_build_is_byte_identical_and_cli_guards_out_dir(tiny_dir, tmp_path):
    """A second build in a fresh process (other hash seed) matches byte for byte; the CLI refuses to
    overwrite without --force; another --seed changes only the weights."""
    again = tmp_path / "again"
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, "-m", "serving.models.make_model", "--size", "tiny", "--out", str(again)],
                   check=True, env=env, capture_output=True)
    expected = _digests(tiny_dir)
    assert _digests(again) == expected

    with pytest.raises(SystemExit) as excinfo:
        main(["--size", "tiny", "--out", str(again), "--seed", "1"])
    assert excinfo.value.code == 2 and _digests(again) == expected

    assert main(["--size", "tiny", "--out", str(again), "--seed", "1", "--force"]) == 0
    reseeded = _digests(again)
    assert reseeded["model.safetensors"] != expected["model.safetensors"]
    assert {k: v for k, v in reseeded.items() if k != "model.safetensors"} == \
           {k: v for k, v in expected.items() if k != "model.safetensors"}
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # no temp dirs left


def test_unknown_size_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="tiny"):
        make_model("huge", str(tmp_path / "x"))


def test_config_agrees_with_tokenizer(tiny_dir, hf_tiny):
    tokenizer, _ = hf_tiny
    config = ModelArchConfig.from_model_dir(tiny_dir)
    assert config.architecture == "LlamaForCausalLM"
    assert config.vocab_size == len(tokenizer) == MODEL_SIZES["tiny"].vocab_size
    assert config.head_dim >= 32 and config.num_kv_heads < config.num_heads
    assert config.bos_token_id == tokenizer.bos_token_id
    assert tokenizer.eos_token_id in config.eos_token_ids
    assert tokenizer.convert_tokens_to_ids("<|end_of_text|>") in config.eos_token_ids
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in config.eos_token_ids


def test_tokenizer_round_trips_text(hf_tiny):
    tokenizer, _ = hf_tiny
    for text in ROUND_TRIP_TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        with_bos = tokenizer.encode(text)
        assert with_bos == [tokenizer.bos_token_id] + ids
    # BPE actually merged: common words are single tokens, not bytes.
    assert len(tokenizer.encode(" the water", add_special_tokens=False)) == 2


def test_chat_template_renders_roles_and_generation_prompt(hf_tiny):
    tokenizer, _ = hf_tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi there "},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|begin_of_text|>"
                    "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    without_prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert without_prompt == text.removesuffix("<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.convert_tokens_to_ids("<|eot_id|>")) == 4


def _greedy(model, prompt_ids: list[int], num_steps: int) -> tuple[list[int], list[float], torch.Tensor]:
    """Greedy decode by full recompute; returns (new ids, top-1/top-2 logit gaps, prompt logits)."""
    ids, gaps, prompt_logits = list(prompt_ids), [], None
    with torch.no_grad():
        for _ in range(num_steps):
            hidden, _ = model(torch.tensor(ids), torch.arange(len(ids)), dense_causal_attention([len(ids)]))
            logits = model.compute_logits(hidden)                          # [L, V]
            prompt_logits = logits if prompt_logits is None else prompt_logits
            top2 = logits[-1].topk(2).values
            gaps.append(float(top2[0] - top2[1]))
            ids.append(int(logits[-1].argmax()))
    return ids[len(prompt_ids):], gaps, prompt_logits


def test_logits_and_greedy_generation_match_transformers(tiny_dir, hf_tiny):
    tokenizer, hf_model = hf_tiny
    ours = load_model(tiny_dir, torch.float32, torch.device("cpu"))
    all_gaps, generations = [], []
    for prompt in PROMPTS:
        prompt_ids = tokenizer.encode(prompt)
        new_ids, gaps, logits = _greedy(ours, prompt_ids, num_steps=12)
        with torch.no_grad():
            hf_logits = hf_model(torch.tensor([prompt_ids])).logits[0]
            hf_out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False,
                                       eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
        torch.testing.assert_close(logits, hf_logits, atol=1e-4, rtol=1e-4)
        assert new_ids == hf_out[0, len(prompt_ids):].tolist()
        all_gaps += gaps
        generations.append(new_ids)
    # Peaked logits (see make_model.init_weights): greedy choices stand well clear of rounding noise...
    gaps = torch.tensor(all_gaps)
    assert (gaps > 1e-2).float().mean() >= 0.95, gaps
    assert gaps.median() > 0.1
    # ...yet the output depends on the prompt and does not repeat one token forever.
    assert len({tuple(g) for g in generations}) == len(PROMPTS)
    assert all(len(set(g)) >= 4 for g in generations), generations


def test_default_model_is_built_once_in_xdg_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    expected_dir = str(tmp_path / "cache" / "pdserve" / "models" / "tiny-llama")
    assert default_model.default_model_dir() == expected_dir
    assert default_model.ensure_default_model() == expected_dir
    config_path = os.path.join(expected_dir, "config.json")
    first_mtime = os.stat(config_path).st_mtime_ns
    assert default_model.ensure_default_model() == expected_dir
    assert os.stat(config_path).st_mtime_ns == first_mtime
    assert ModelArchConfig.from_model_dir(expected_dir).vocab_size == MODEL_SIZES["tiny"].vocab_size
    assert sorted(os.listdir(os.path.dirname(expected_dir))) == ["tiny-llama"]  # no temp dir left
