"""The llama.cpp engine's sampler, on hand-made logits (no model needed)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from backends.llamacpp.sampling import Sampling, TokenSampler, sample_rows


def rows(*logits: list[float]) -> np.ndarray:
    return np.array(logits, dtype=np.float32)


def draws(settings: Sampling, logits: list[float], n: int) -> Counter[int]:
    sampler = TokenSampler(settings)
    row = rows(logits)[0]
    return Counter(sampler.pick(row) for _ in range(n))


def test_greedy_rows_take_the_first_highest_logit_as_llama_cpp_does() -> None:
    logits = rows([0.0, 2.0, 2.0, 1.0], [5.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.0, 0.5])
    samplers = [TokenSampler(Sampling(temperature=0)) for _ in range(3)]
    assert sample_rows(logits, samplers) == [1, 0, 3]


def test_each_row_is_sampled_by_its_own_settings() -> None:
    # row 0 greedy, row 1 sampled with a nucleus that holds one token only, row 2 greedy
    logits = rows([0.0, 9.0, 0.0], [9.0, 0.0, 0.0], [0.0, 0.0, 9.0])
    samplers = [
        TokenSampler(Sampling(temperature=0)),
        TokenSampler(Sampling(temperature=1.0, top_p=0.5, seed=1)),
        TokenSampler(Sampling(temperature=0)),
    ]
    for _ in range(20):
        assert sample_rows(logits, samplers) == [1, 0, 2]


def test_temperature_draws_follow_the_softmax() -> None:
    # p = 1/4, 3/4 at temperature 1; at temperature 0.5 the logits double: 1/10, 9/10
    logits = [0.0, math.log(3)]
    hot = draws(Sampling(temperature=1.0, seed=3), logits, 4000)
    cool = draws(Sampling(temperature=0.5, seed=3), logits, 4000)
    assert abs(hot[1] / 4000 - 0.75) < 0.03
    assert abs(cool[1] / 4000 - 0.90) < 0.02


def test_top_p_keeps_the_smallest_set_that_reaches_it() -> None:
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.75 keeps the first two, 0.85 the first three
    logits = [math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]
    two = draws(Sampling(temperature=1.0, top_p=0.75, seed=5), logits, 3000)
    three = draws(Sampling(temperature=1.0, top_p=0.85, seed=5), logits, 3000)
    everything = draws(Sampling(temperature=1.0, top_p=1.0, seed=5), logits, 3000)
    assert set(two) == {0, 1}
    assert abs(two[0] / 3000 - 0.5 / 0.8) < 0.04  # renormalised within the nucleus
    assert set(three) == {0, 1, 2}
    assert set(everything) == {0, 1, 2, 3}


def test_top_p_over_a_flat_distribution_looks_past_the_first_candidates() -> None:
    # 1,000 equally likely tokens: the nucleus for 0.5 is 500 of them, and ties rank by token id
    got = draws(Sampling(temperature=1.0, top_p=0.5, seed=9), [0.0] * 1000, 3000)
    assert max(got) < 500
    assert len(got) > 300


def test_top_p_ranks_past_the_likely_tokens_when_they_hold_too_little() -> None:
    # one likely token (p = 0.64) and 1,000 tokens below the first floor (e^-7.5 < 1e-3 of it)
    # that hold the rest: a nucleus of 0.9 takes token 0 and the first 720 of them
    logits = [0.0] + [-7.5] * 1000
    got = draws(Sampling(temperature=1.0, top_p=0.9, seed=4), logits, 2000)
    assert 0.67 < got[0] / 2000 < 0.76  # 1 / (1 + 720 e^-7.5) = 0.715
    assert len(got) > 100 and 600 < max(got) <= 720


def test_without_top_p_the_unlikely_tail_is_drawn_as_often_as_it_should_be() -> None:
    # the same shape with no nucleus: the 1,000 unlikely tokens hold 36% of the mass together
    got = draws(Sampling(temperature=1.0, seed=6), [0.0] + [-7.5] * 1000, 3000)
    assert abs(got[0] / 3000 - 1 / (1 + 1000 * math.exp(-7.5))) < 0.03  # 0.644
    assert len(got) > 500 and max(got) > 900


def test_a_seed_makes_draws_reproducible() -> None:
    logits = [0.1 * i for i in range(50)]

    def sequence(seed: int) -> list[int]:
        sampler = TokenSampler(Sampling(temperature=1.0, top_p=0.9, seed=seed))
        return [sampler.pick(rows(logits)[0]) for _ in range(40)]

    assert sequence(11) == sequence(11)
    assert sequence(11) != sequence(12)


def test_a_frequency_penalty_grows_with_each_use_of_a_generated_token() -> None:
    # token 0 leads by 1.0; every use costs it 2.0
    logits = rows([3.0, 2.0, -50.0])
    sampler = TokenSampler(Sampling(temperature=0, frequency_penalty=2.0))
    assert not sampler.greedy  # penalised rows are not batched with the plain greedy ones
    assert [sample_rows(logits, [sampler])[0] for _ in range(4)] == [0, 1, 0, 1]
    assert logits[0, 0] == 3.0  # the engine's logits are read, never written


def test_a_presence_penalty_is_paid_once_per_token() -> None:
    logits = rows([3.0, 2.5])
    sampler = TokenSampler(Sampling(temperature=0, presence_penalty=1.0))
    assert [sample_rows(logits, [sampler])[0] for _ in range(4)] == [0, 1, 0, 0]


def test_penalised_sampling_at_a_temperature_reads_the_logits_only() -> None:
    logits = rows([3.0, 2.0, 1.0])
    sampler = TokenSampler(Sampling(temperature=0.8, frequency_penalty=1.0, seed=2))
    for _ in range(10):
        sample_rows(logits, [sampler])
    assert sum(sampler.counts.values()) == 10
    assert logits.tolist() == [[3.0, 2.0, 1.0]]


def test_every_temperature_and_top_p_the_edge_admits_gives_a_token() -> None:
    # 1/1e-300 overflows float32: the weights went NaN and the draw raised, killing the engine
    logits = rows([1.0, 3.0, 2.0, -4.0], [1.0, 3.0, 2.0, -4.0])
    for temperature in (0.0, 1e-300, 1e-45, 3e-39, 1e-20, 9e-6, 1e-5, 0.5, 2.0):
        for top_p in (0.0, 1e-300, 1e-45, 0.5, 1.0):
            for penalty in (-2.0, 0.0, 2.0):
                settings = Sampling(
                    temperature=temperature,
                    top_p=top_p,
                    seed=1,
                    frequency_penalty=penalty,
                    presence_penalty=-penalty,
                )
                sampler = TokenSampler(settings)
                for _ in range(5):
                    token = sample_rows(logits, [sampler, TokenSampler(Sampling(temperature=0))])
                    assert 0 <= token[0] < 4 and token[1] == 1
                if temperature < 1e-5 and not penalty:
                    assert sampler.greedy and token[0] == 1


def test_nan_logits_still_give_a_token() -> None:
    sampler = TokenSampler(Sampling(temperature=1.0, top_p=0.9, seed=1))
    assert 0 <= sample_rows(rows([np.nan, 1.0, np.nan]), [sampler])[0] < 3
