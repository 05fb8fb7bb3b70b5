"""Token sampler: logits of one step -> one token (and optional logprobs) per sequence.

Order of operations (as vLLM v1 / OpenAI):

    raw logits ──► logprobs (log_softmax of the raw logits, for rows that asked)
        │
        ▼
    penalties (repetition over prompt+output, then frequency and presence over output)
        │
        ├──► greedy rows: argmax
        ▼
    / temperature ─► top-k ─► top-p ─► min-p ─► softmax ─► inverse CDF with one uniform per row

Inverse-CDF sampling (the first token whose cumulative probability, summed in float64, reaches
(1 - u) of the row's total, u ~ U[0, 1)) samples exactly from p with one random number per row, and
lets each seeded row draw it from its own generator, so a seeded request gets the same tokens
whatever else shares its batch. (The exponential race vLLM uses on GPUs, argmax(p / q) with
q ~ Exp(1) per vocabulary entry, draws a vocabulary's worth of noise per row: on CPU 0.8–1.0 ms a row
for 32k entries, 12–16% of a batch-8 decode step of the small model.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from scheduler.sampling_params import SamplingParams
from serving.engine.protocol import TokenLogprob

# Same threshold as SamplingParams.greedy: below it, dividing by the temperature overflows.
_GREEDY_TEMPERATURE = 1e-5


def make_generator(seed: int, device: torch.device | str = "cpu", num_sampled: int = 0) -> torch.Generator:
    """The per-request generator a runner keeps for a seeded request (one per sequence, for its life).

    A request that already has `num_sampled` randomly sampled tokens (resumed after preemption, or
    continued on a decode instance after a remote prefill) gets its generator advanced past the draws
    those tokens used (one uniform per token, see inverse_cdf_sample), so its later tokens are the ones
    an uninterrupted run would sample."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    for _ in range(num_sampled):
        _uniform(generator, device)
    return generator


def _uniform(generator: torch.Generator, device: torch.device | str) -> Tensor:
    """The one draw a seeded row makes per sampled token: U[0, 1) in float64, shape [1]."""
    return torch.rand(1, dtype=torch.float64, generator=generator, device=device)


@dataclass
class SamplingBatch:
    """Per-step sampling inputs, one row per sequence that samples a token this step. Built by the
    model runner from the requests' SamplingParams and token histories. Tensors on the logits' device.
    The flags are computed once in `from_params` from Python values, so the sampler picks its path
    without reading tensors back."""
    temperature: Tensor  # [B] float32
    top_p: Tensor  # [B] float32
    top_k: Tensor  # [B] int64, 0 = disabled
    min_p: Tensor  # [B] float32
    presence_penalty: Tensor  # [B] float32
    frequency_penalty: Tensor  # [B] float32
    repetition_penalty: Tensor  # [B] float32
    generators: list[torch.Generator | None]  # per-row generator for seeded requests, else None
    prompt_token_ids: list[list[int]]  # for the repetition penalty
    output_token_ids: list[list[int]]  # tokens generated so far (all penalties)
    num_logprobs: list[int | None]  # None: no logprobs; k >= 0: sampled token's + top-k
    is_greedy: list[bool]  # per row: temperature ~ 0 or top_k == 1
    has_penalties: list[bool]  # per row: any penalty differs from neutral
    all_greedy: bool
    all_random: bool
    no_penalties: bool
    no_top_k: bool
    no_top_p: bool
    no_min_p: bool
    no_logprobs: bool

    @property
    def num_rows(self) -> int:
        return len(self.is_greedy)

    @classmethod
    def from_params(cls, params: list[SamplingParams], prompt_token_ids: list[list[int]],
                    output_token_ids: list[list[int]], generators: list[torch.Generator | None],
                    device: torch.device | str) -> "SamplingBatch":
        """Assumes all lists are per row, in the same order as the logits' rows. Mutates nothing."""
        num_rows = len(params)
        if not len(prompt_token_ids) == len(output_token_ids) == len(generators) == num_rows:
            raise ValueError(
                f"need one prompt, output history and generator per row ({num_rows} rows), got "
                f"{len(prompt_token_ids)}, {len(output_token_ids)} and {len(generators)}")

        def column(name: str, dtype: torch.dtype) -> Tensor:
            return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=device)

        is_greedy = [p.greedy for p in params]
        has_penalties = [p.has_penalties for p in params]
        num_logprobs = [p.logprobs for p in params]
        random_params = [p for p, greedy in zip(params, is_greedy) if not greedy]
        return cls(
            temperature=column("temperature", torch.float32),
            top_p=column("top_p", torch.float32),
            top_k=column("top_k", torch.int64),
            min_p=column("min_p", torch.float32),
            presence_penalty=column("presence_penalty", torch.float32),
            frequency_penalty=column("frequency_penalty", torch.float32),
            repetition_penalty=column("repetition_penalty", torch.float32),
            generators=list(generators),
            prompt_token_ids=prompt_token_ids,
            output_token_ids=output_token_ids,
            num_logprobs=num_logprobs,
            is_greedy=is_greedy,
            has_penalties=has_penalties,
            all_greedy=all(is_greedy),
            all_random=not any(is_greedy),
            no_penalties=not any(has_penalties),
            no_top_k=all(p.top_k == 0 for p in random_params),
            no_top_p=all(p.top_p >= 1.0 for p in random_params),
            no_min_p=all(p.min_p == 0.0 for p in random_params),
            no_logprobs=all(k is None for k in num_logprobs),
        )


@dataclass
class SamplerOutput:
    token_ids: Tensor  # [B] int64
    logprobs: list[TokenLogprob | None]  # per row; None where num_logprobs is None


class Sampler:
    """Stateless; the only state a step consumes is the generators' (advanced by seeded draws)."""

    def __call__(self, logits: Tensor, batch: SamplingBatch,
                 default_generator: torch.Generator | None = None) -> SamplerOutput:
        """logits: [B, V] float32, left unmodified. Advances the generators of seeded random rows and
        `default_generator` (torch's default when None) if an unseeded random row exists."""
        if logits.dim() != 2 or logits.shape[0] != batch.num_rows:
            raise ValueError(f"logits must be [{batch.num_rows}, vocab], got {list(logits.shape)}")
        raw_logits = logits.float()  # no copy for float32: everything below is out of place
        if batch.all_greedy and batch.no_penalties:
            # The decode fast path: nothing but argmax (plus logprobs when asked).
            token_ids = raw_logits.argmax(dim=-1)
        else:
            token_ids = self._sample(raw_logits, batch, default_generator)
        logprobs = ([None] * batch.num_rows if batch.no_logprobs
                    else gather_logprobs(raw_logits, token_ids, batch.num_logprobs))
        return SamplerOutput(token_ids, logprobs)

    def _sample(self, logits: Tensor, batch: SamplingBatch,
                default_generator: torch.Generator | None) -> Tensor:
        """logits [B, V] -> [B] int64."""
        if not batch.no_penalties:
            logits = apply_penalties(logits, batch)
        if batch.all_greedy:
            return logits.argmax(dim=-1)
        if batch.all_random:
            return self._sample_random(logits, batch, list(range(batch.num_rows)), default_generator)
        token_ids = logits.argmax(dim=-1)  # [B]
        random_ids = [i for i, greedy in enumerate(batch.is_greedy) if not greedy]
        rows = torch.tensor(random_ids, dtype=torch.long, device=logits.device)  # [R]
        sampled = self._sample_random(logits[rows], batch, random_ids, default_generator)  # [R]
        return token_ids.index_copy(0, rows, sampled)

    def _sample_random(self, logits: Tensor, batch: SamplingBatch, row_ids: list[int],
                       default_generator: torch.Generator | None) -> Tensor:
        """logits: [R, V], the rows `row_ids` of the batch (all random). Returns [R] int64."""
        rows = None if len(row_ids) == batch.num_rows else torch.tensor(
            row_ids, dtype=torch.long, device=logits.device)

        def take(values: Tensor) -> Tensor:
            return values if rows is None else values[rows]

        logits = logits / take(batch.temperature).unsqueeze(1)  # [R, V], a fresh tensor from here
        if not (batch.no_top_k and batch.no_top_p):
            logits = apply_top_k_top_p(logits, take(batch.top_k), take(batch.top_p))
        if not batch.no_min_p:
            logits = apply_min_p(logits, take(batch.min_p))
        probs = logits.softmax(dim=-1)  # [R, V]
        generators = [batch.generators[i] for i in row_ids]
        return inverse_cdf_sample(probs, generators, default_generator)


def gather_logprobs(raw_logits: Tensor, token_ids: Tensor, num_logprobs: list[int | None]
                    ) -> list[TokenLogprob | None]:
    """Logprobs of the raw model distribution (before penalties and temperature, as vLLM's default):
    the sampled token's and the top num_logprobs[i] alternatives, best first."""
    row_ids = [i for i, k in enumerate(num_logprobs) if k is not None]
    rows = torch.tensor(row_ids, dtype=torch.long, device=raw_logits.device)  # [L]
    logprobs = raw_logits[rows].log_softmax(dim=-1)  # [L, V]
    sampled = logprobs.gather(1, token_ids[rows].unsqueeze(1)).squeeze(1)  # [L]
    max_k = min(max(num_logprobs[i] for i in row_ids), logprobs.shape[1])
    top_values, top_ids = logprobs.topk(max_k, dim=-1)  # [L, max_k] each, sorted best first
    # One transfer to Python for the whole batch instead of one per element.
    sampled_list, top_values_list, top_ids_list = sampled.tolist(), top_values.tolist(), top_ids.tolist()
    sampled_ids = token_ids[rows].tolist()
    records: list[TokenLogprob | None] = [None] * len(num_logprobs)
    for j, i in enumerate(row_ids):
        k = num_logprobs[i]
        top = list(zip(top_ids_list[j][:k], top_values_list[j][:k]))
        records[i] = TokenLogprob(token_id=sampled_ids[j], logprob=sampled_list[j], top=top)
    return records


def apply_penalties(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Returns penalised logits [B, V] (a new tensor). Rows without penalties come back unchanged
    bit for bit (division/multiplication by 1 and subtraction of 0)."""
    num_rows, vocab_size = logits.shape
    # Histories of rows without penalties are left out: building [B, V] counts from long prompts
    # costs more than the penalties themselves.
    prompt_ids = [ids if batch.has_penalties[i] else [] for i, ids in enumerate(batch.prompt_token_ids)]
    output_ids = [ids if batch.has_penalties[i] else [] for i, ids in enumerate(batch.output_token_ids)]
    output_counts = token_counts(output_ids, vocab_size, logits.device)  # [B, V] float32
    output_mask = output_counts > 0  # [B, V]
    seen_mask = output_mask | (token_counts(prompt_ids, vocab_size, logits.device) > 0)  # [B, V]

    # Repetition penalty (HF/vLLM): push seen tokens towards "less likely" whatever their sign.
    penalty = torch.where(seen_mask, batch.repetition_penalty.unsqueeze(1), 1.0)  # [B, V]
    logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    # OpenAI: logit -= frequency * count + presence * (count > 0), over generated tokens only.
    logits = logits - batch.frequency_penalty.unsqueeze(1) * output_counts
    logits = logits - batch.presence_penalty.unsqueeze(1) * output_mask.float()
    return logits


def token_counts(token_ids: list[list[int]], vocab_size: int, device: torch.device) -> Tensor:
    """How many times each vocabulary entry occurs in each row's list: [B, V] float32."""
    num_rows = len(token_ids)
    max_len = max((len(ids) for ids in token_ids), default=0)
    # Pad with an extra column V that absorbs the padding and is dropped afterwards.
    padded = torch.full((num_rows, max_len), vocab_size, dtype=torch.long)  # [B, L]
    for i, ids in enumerate(token_ids):
        padded[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    padded = padded.to(device)
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=torch.float32, device=device)  # [B, V+1]
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab_size]


def apply_top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """logits [R, V]; top_k [R] int64 (0 = disabled); top_p [R] float32. Masked entries -> -inf.

    One ascending sort serves both filters. Top-k keeps every token whose logit ties the k-th
    largest (as vLLM). Top-p runs on the distribution top-k left: in ascending order a token is
    dropped when the mass at or below it is <= 1 - p, i.e. when the tokens above it already reach p.
    """
    vocab_size = logits.shape[1]
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=False)  # [R, V] each
    k = torch.where(top_k > 0, top_k, vocab_size).clamp(max=vocab_size)  # [R]
    kth_largest = sorted_logits.gather(1, (vocab_size - k).unsqueeze(1))  # [R, 1]
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))

    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [R, V] ascending mass
    drop = cumulative <= (1.0 - top_p).unsqueeze(1)  # [R, V]
    drop[:, -1] = False  # the top token always stays
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return sorted_logits.scatter(1, sorted_ids, sorted_logits)


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """logits [R, V]; min_p [R]. Drops tokens whose probability is below min_p * the top probability."""
    probs = logits.softmax(dim=-1)  # [R, V]
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)  # [R, 1]
    return logits.masked_fill(probs < threshold, float("-inf"))


def inverse_cdf_sample(probs: Tensor, generators: list[torch.Generator | None],
                       default_generator: torch.Generator | None) -> Tensor:
    """probs [R, V] (rows need not be normalised; filtered-out entries 0) -> [R] int64 sampled from
    each row. Seeded rows draw their one uniform from their own generator only, so their draw depends
    on nothing but the generator's state and the row; unseeded rows take theirs from
    `default_generator` (torch's default when None)."""
    num_rows, device = probs.shape[0], probs.device
    uniform = torch.empty(num_rows, 1, dtype=torch.float64, device=device)  # [R, 1]
    if any(generator is None for generator in generators):
        uniform.uniform_(generator=default_generator)
    for i, generator in enumerate(generators):
        if generator is not None:
            uniform[i] = _uniform(generator, device)
    cdf = probs.to(torch.float64).cumsum(dim=-1)  # [R, V]; float64 keeps the tail's mass exact enough
    # The first entry whose cumulative sum reaches the target: 1 - u lies in (0, 1], so the target is
    # above 0 and at most the total, and the entry found always has probability above 0.
    target = (1.0 - uniform) * cdf[:, -1:]  # [R, 1]
    token_ids = torch.searchsorted(cdf, target).squeeze(1)  # [R]
    return token_ids.clamp_(max=probs.shape[1] - 1)  # only a row of NaN finds no such entry
