"""Sampler tests: each checks the sampler against a reference written here (argmax, softmax, the
allowed set of top-k/top-p/min-p computed by hand, a per-element penalty loop)."""
from __future__ import annotations

import math

import pytest
import torch

from scheduler.sampling_params import SamplingParams
from serving.sampler import Sampler, SamplingBatch, apply_penalties, make_generator


def make_batch(params: list[SamplingParams], prompt_token_ids=None, output_token_ids=None,
               generators=None) -> SamplingBatch:
    num_rows = len(params)
    return SamplingBatch.from_params(
        params,
        prompt_token_ids if prompt_token_ids is not None else [[] for _ in range(num_rows)],
        output_token_ids if output_token_ids is not None else [[] for _ in range(num_rows)],
        generators if generators is not None else [None] * num_rows,
        device="cpu")


def draw_many(logits_row: torch.Tensor, params: SamplingParams, num_draws: int, seed: int = 0
              ) -> torch.Tensor:
    """num_draws independent samples of one distribution, as one batch of identical rows: [N]."""
    logits = logits_row.unsqueeze(0).expand(num_draws, -1).contiguous()  # [N, V]
    batch = make_batch([params] * num_draws)
    return Sampler()(logits, batch, default_generator=make_generator(seed)).token_ids


def frequencies(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return torch.bincount(token_ids, minlength=vocab_size).float() / token_ids.numel()


def allowed_set(probs: list[float], top_k: int, top_p: float, min_p: float) -> set[int]:
    """Reference filter, one token at a time: top-k, then top-p on the renormalised survivors,
    then min-p relative to the best survivor."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept = order[:top_k] if top_k > 0 else order
    total = sum(probs[i] for i in kept)
    prefix, mass = [], 0.0
    for i in kept:  # best first: add tokens until their mass reaches top_p
        prefix.append(i)
        mass += probs[i] / total
        if mass >= top_p:
            break
    best = probs[prefix[0]]
    return {i for i in prefix if probs[i] >= min_p * best}


# --- greedy -----------------------------------------------------------------------------------

def test_greedy_is_argmax_on_fast_path_and_with_logprobs():
    logits = torch.randn(16, 97, generator=make_generator(1))
    for logprobs in (None, 3):
        batch = make_batch([SamplingParams(temperature=0.0, logprobs=logprobs)] * 16)
        out = Sampler()(logits, batch)
        assert out.token_ids.dtype == torch.int64
        assert torch.equal(out.token_ids, torch.argmax(logits, dim=-1))


def test_top_k_one_is_greedy_and_greedy_rows_in_mixed_batch_are_argmax():
    logits = torch.randn(6, 50, generator=make_generator(2))
    params = [SamplingParams(temperature=1.5, top_k=1), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.0), SamplingParams(temperature=0.7, top_p=0.9),
              SamplingParams(temperature=1.0, top_k=1, top_p=0.5), SamplingParams(temperature=2.0)]
    out = Sampler()(logits, make_batch(params), default_generator=make_generator(3))
    expected = torch.argmax(logits, dim=-1)
    for i in (0, 2, 4):
        assert out.token_ids[i] == expected[i]


# --- filters ----------------------------------------------------------------------------------

PROBS = [0.05, 0.4, 0.1, 0.3, 0.15]  # best first: 1, 3, 4, 2, 0


@pytest.mark.parametrize("top_k, top_p, min_p, expected", [
    (2, 1.0, 0.0, {1, 3}),
    (3, 1.0, 0.0, {1, 3, 4}),
    (0, 0.3, 0.0, {1}),  # the top token alone already reaches p
    (0, 0.5, 0.0, {1, 3}),
    (0, 0.8, 0.0, {1, 3, 4}),
    (0, 1.0, 0.3, {1, 3, 4}),  # keep prob >= 0.12
    (0, 1.0, 0.9, {1}),
    (3, 0.6, 0.0, {1, 3}),  # top-p on the top-3 renormalised: 0.47, 0.35 -> reaches 0.6 at 2
])
def test_filters_sample_exactly_the_allowed_set(top_k, top_p, min_p, expected):
    assert allowed_set(PROBS, top_k, top_p, min_p) == expected  # the reference agrees with the table
    logits = torch.tensor(PROBS).log()
    params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, min_p=min_p)
    token_ids = draw_many(logits, params, num_draws=4000)
    # Nothing outside the set, and every allowed token shows up (the filter is not too strict).
    assert set(token_ids.tolist()) == expected


def test_filters_on_random_distributions_match_reference_set_and_renormalised_probs():
    gen = make_generator(4)
    for trial in range(6):
        logits = torch.randn(12, generator=gen) * 2.0
        probs = logits.softmax(-1).tolist()
        top_k = int(torch.randint(0, 8, (1,), generator=gen))
        top_p = float(torch.empty(1).uniform_(0.3, 1.0, generator=gen))
        min_p = float(torch.empty(1).uniform_(0.0, 0.2, generator=gen))
        expected = allowed_set(probs, top_k, top_p, min_p)
        params = SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, min_p=min_p)
        token_ids = draw_many(logits, params, num_draws=6000, seed=trial)
        assert set(token_ids.tolist()) <= expected
        # Survivors keep their relative probabilities.
        kept_mass = sum(probs[i] for i in expected)
        reference = torch.tensor([probs[i] / kept_mass if i in expected else 0.0 for i in range(12)])
        assert (frequencies(token_ids, 12) - reference).abs().max() < 0.03


# --- distribution and temperature ------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_empirical_distribution_matches_softmax_over_temperature(temperature):
    logits = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5, 1.5, -0.5, 0.2])
    token_ids = draw_many(logits, SamplingParams(temperature=temperature), num_draws=20000)
    reference = (logits / temperature).softmax(-1)
    # std of one frequency <= sqrt(0.25 / 20000) = 0.0035: 0.015 is > 4 sigma.
    assert (frequencies(token_ids, 8) - reference).abs().max() < 0.015


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    top_share = {t: frequencies(draw_many(logits, SamplingParams(temperature=t), 8000), 4)[0].item()
                 for t in (0.3, 1.0, 3.0)}
    assert top_share[0.3] > top_share[1.0] + 0.1 > top_share[3.0] + 0.2
    assert top_share[0.3] > 0.9 and top_share[3.0] < 0.45


# --- reproducibility --------------------------------------------------------------------------

def run_seeded_steps(rows: list[tuple[torch.Tensor, SamplingParams]], num_steps: int) -> list[list[int]]:
    """Runs num_steps steps over a fixed batch with a generator per seeded row; tokens per row."""
    generators = [make_generator(p.seed) if p.seed is not None else None for _, p in rows]
    logits = torch.stack([row for row, _ in rows])  # [B, V]
    batch = make_batch([p for _, p in rows], generators=generators)
    default_generator = make_generator(999)
    tokens = [[] for _ in rows]
    for _ in range(num_steps):
        out = Sampler()(logits, batch, default_generator=default_generator)
        for i, token_id in enumerate(out.token_ids.tolist()):
            tokens[i].append(token_id)
    return tokens


def test_same_seed_same_tokens_whatever_the_batch():
    gen = make_generator(5)
    target = torch.randn(64, generator=gen) * 0.5
    seeded = SamplingParams(temperature=1.0, seed=1234)
    alone = run_seeded_steps([(target, seeded)], num_steps=20)[0]
    others = [
        (torch.randn(64, generator=gen), SamplingParams(temperature=0.8)),  # unseeded
        (torch.randn(64, generator=gen), SamplingParams(temperature=1.0, top_k=5, seed=7)),
        (torch.randn(64, generator=gen), SamplingParams(temperature=0.0)),  # greedy
        (torch.randn(64, generator=gen), SamplingParams(temperature=1.0, top_p=0.5, min_p=0.1)),
    ]
    assert run_seeded_steps(others[:2] + [(target, seeded)] + others[2:], 20)[2] == alone
    assert run_seeded_steps([(target, seeded)] + others[::-1], 20)[0] == alone
    assert len(set(alone)) > 5  # a flat distribution: the tokens really are random
    other_seed = run_seeded_steps([(target, seeded.clone(seed=4321))], num_steps=20)[0]
    assert other_seed != alone


def test_a_generator_advanced_past_n_tokens_samples_what_an_uninterrupted_run_samples_next():
    """A seeded request resumed elsewhere (a decode instance after a remote prefill, or after a
    preemption) makes its generator with num_sampled: its next tokens are the uninterrupted run's."""
    logits = torch.randn(1, 300, generator=make_generator(13))
    params = SamplingParams(temperature=1.0, seed=42)
    uninterrupted = run_seeded_steps([(logits[0], params)], num_steps=12)[0]
    for num_sampled in (1, 5):
        batch = make_batch([params], generators=[make_generator(42, num_sampled=num_sampled)])
        resumed = [Sampler()(logits, batch).token_ids.item() for _ in range(12 - num_sampled)]
        assert resumed == uninterrupted[num_sampled:]


def test_entries_of_probability_zero_are_never_drawn_and_a_long_tail_keeps_its_mass():
    """Inverse-CDF sampling: zero entries at either end or between are never drawn; 998 entries of
    1e-4 each are drawn 10% of the time together."""
    logits = torch.full((1000,), -math.inf)
    logits[0] = math.log(0.9)
    logits[1:999] = math.log(0.1 / 998)  # entries 1..998 share 0.1; entry 999 has probability 0
    token_ids = draw_many(logits, SamplingParams(temperature=1.0), num_draws=40000)
    assert 999 not in set(token_ids.tolist())
    tail = (token_ids > 0).float().mean().item()
    assert abs(tail - 0.1) < 0.006  # std 0.0015
    edges = torch.tensor([-math.inf, 0.0, -math.inf, 0.0, -math.inf])
    assert set(draw_many(edges, SamplingParams(temperature=1.0), num_draws=4000).tolist()) == {1, 3}


def test_default_generator_makes_unseeded_rows_reproducible():
    logits = torch.randn(8, 64, generator=make_generator(6)) * 0.5
    batch = make_batch([SamplingParams(temperature=1.0)] * 8)
    first = Sampler()(logits, batch, default_generator=make_generator(11)).token_ids
    again = Sampler()(logits, batch, default_generator=make_generator(11)).token_ids
    other = Sampler()(logits, batch, default_generator=make_generator(12)).token_ids
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


# --- penalties --------------------------------------------------------------------------------

def reference_penalties(logits: list[float], prompt_ids: list[int], output_ids: list[int],
                        params: SamplingParams) -> list[float]:
    """HF/vLLM repetition penalty over prompt+output, then OpenAI frequency/presence over output."""
    result = []
    for token_id, logit in enumerate(logits):
        if token_id in prompt_ids or token_id in output_ids:
            rp = params.repetition_penalty
            logit = logit / rp if logit > 0 else logit * rp
        count = output_ids.count(token_id)
        logit -= params.frequency_penalty * count
        logit -= params.presence_penalty * (1.0 if count > 0 else 0.0)
        result.append(logit)
    return result


PENALTY_CASES = [
    SamplingParams(temperature=0.0, repetition_penalty=1.7),
    SamplingParams(temperature=0.0, repetition_penalty=0.6),
    SamplingParams(temperature=0.0, frequency_penalty=0.9),
    SamplingParams(temperature=0.0, frequency_penalty=-1.3),
    SamplingParams(temperature=0.0, presence_penalty=1.5),
    SamplingParams(temperature=0.0, presence_penalty=-0.4),
    SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5,
                   presence_penalty=0.8),
    SamplingParams(temperature=0.0),  # no penalty: must come back bit for bit
]


def test_each_penalty_matches_reference():
    vocab_size = 20
    logits = torch.randn(len(PENALTY_CASES), vocab_size, generator=make_generator(7)) * 3.0
    prompt_ids = [[0, 1, 2, 3, 3, 4]] * len(PENALTY_CASES)
    # Token 5 three times, 1 (also in the prompt) twice, 9 once; 0, 2-4 in the prompt only.
    output_ids = [[5, 1, 5, 9, 1, 5]] * len(PENALTY_CASES)
    batch = make_batch(PENALTY_CASES, prompt_ids, output_ids)
    penalised = apply_penalties(logits, batch)
    for i, params in enumerate(PENALTY_CASES):
        expected = reference_penalties(logits[i].tolist(), prompt_ids[i], output_ids[i], params)
        assert torch.allclose(penalised[i], torch.tensor(expected), atol=1e-6, rtol=1e-6), params
    assert torch.equal(penalised[-1], logits[-1])
    # Greedy sampling picks the argmax of the penalised logits.
    out = Sampler()(logits, batch)
    assert torch.equal(out.token_ids, torch.argmax(penalised, dim=-1))


def test_penalties_change_the_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, -1.0, 0.0]])
    params = SamplingParams(temperature=0.0, frequency_penalty=0.5)
    assert Sampler()(logits, make_batch([params], [[]], [[1]])).token_ids.item() == 0
    assert Sampler()(logits, make_batch([params], [[]], [[0]])).token_ids.item() == 1
    # Repetition penalty over the prompt only, unlike frequency/presence.
    rep = SamplingParams(temperature=0.0, repetition_penalty=1.2)
    assert Sampler()(logits, make_batch([rep], [[0]], [[]])).token_ids.item() == 1
    freq = SamplingParams(temperature=0.0, frequency_penalty=2.0, presence_penalty=2.0)
    assert Sampler()(logits, make_batch([freq], [[0]], [[]])).token_ids.item() == 0


# --- logprobs ---------------------------------------------------------------------------------

def test_logprobs_are_raw_log_softmax_with_sorted_top():
    vocab_size = 30
    logits = torch.randn(4, vocab_size, generator=make_generator(8)) * 2.0
    params = [SamplingParams(temperature=0.7, logprobs=5, repetition_penalty=1.5),
              SamplingParams(temperature=0.0, logprobs=0),
              SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.0, logprobs=20, presence_penalty=1.0)]
    batch = make_batch(params, [[1, 2]] * 4, [[3, 3]] * 4, [make_generator(1), None, None, None])
    out = Sampler()(logits, batch, default_generator=make_generator(9))
    assert out.logprobs[2] is None
    for i in (0, 1, 3):
        row = logits[i].tolist()
        log_z = math.log(sum(math.exp(x) for x in row))
        reference = [x - log_z for x in row]
        record = out.logprobs[i]
        assert record.token_id == out.token_ids[i].item()
        assert record.logprob == pytest.approx(reference[record.token_id], abs=1e-5)
        best_first = sorted(range(vocab_size), key=lambda t: -reference[t])[:params[i].logprobs]
        assert [t for t, _ in record.top] == best_first
        assert [lp for _, lp in record.top] == pytest.approx([reference[t] for t in best_first],
                                                             abs=1e-5)
    assert out.logprobs[1].top == []


# --- contract ---------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, logprobs=2, repetition_penalty=1.5, presence_penalty=1.0),
    SamplingParams(temperature=0.8, top_k=3, top_p=0.7, min_p=0.1, frequency_penalty=0.5),
    SamplingParams(temperature=1.2, seed=3, logprobs=1),
])
def test_caller_logits_are_not_modified(params):
    logits = torch.randn(3, 40, generator=make_generator(10))
    before = logits.clone()
    generators = [make_generator(params.seed) if params.seed is not None else None] * 3
    Sampler()(logits, make_batch([params] * 3, [[1, 2, 3]] * 3, [[4, 4, 5]] * 3, generators))
    assert torch.equal(logits, before)


def test_from_params_flags_and_validation():
    batch = make_batch([SamplingParams(temperature=0.0), SamplingParams(top_k=1)])
    assert batch.all_greedy and not batch.all_random and batch.no_penalties and batch.no_logprobs
    batch = make_batch([SamplingParams(top_p=0.9), SamplingParams(temperature=0.0, logprobs=0,
                                                                 presence_penalty=0.1)])
    assert not batch.all_greedy and not batch.all_random
    assert batch.no_top_k and not batch.no_top_p and batch.no_min_p
    assert not batch.no_penalties and not batch.no_logprobs
    assert batch.top_k.dtype == torch.int64 and batch.temperature.dtype == torch.float32
    with pytest.raises(ValueError, match="one prompt"):
        SamplingBatch.from_params([SamplingParams()], [[]], [], [None], device="cpu")
    with pytest.raises(ValueError, match="logits must be"):
        Sampler()(torch.zeros(2, 5), make_batch([SamplingParams()]))


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "presence_penalty",
                                   "frequency_penalty", "repetition_penalty"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_sampling_params_reject_non_finite_values(field, value):
    # NaN passes a range check written as `if value < 0: raise` (every comparison is False)
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        SamplingParams(**{field: value})


def test_sampling_params_bound_stop_strings_and_top_k():
    SamplingParams(stop=["x" * 1000] * 16, top_k=2**31 - 1)
    with pytest.raises(ValueError, match="at most 16 stop strings"):
        SamplingParams(stop=[str(i) for i in range(17)])
    with pytest.raises(ValueError, match="at most 1000 characters, got one of 1001"):
        SamplingParams(stop=["ok", "x" * 1001])
    with pytest.raises(ValueError, match="top_k must be -1 .* 2147483647"):  # an int32 on the instance wire
        SamplingParams(top_k=2**31)
