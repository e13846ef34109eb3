"""Per-step generators: splitmix64 against its reference outputs, and distinct draws for distinct run seeds on CPU."""
import torch

from adaptive_sched.seeding import mixed_seed, splitmix64, step_generator

CPU = torch.device("cpu")


def test_splitmix64_matches_the_reference_sequence():
    # the reference generator seeded with 0 yields splitmix64(0), splitmix64(γ), splitmix64(2γ), ...
    gamma = 0x9E3779B97F4A7C15
    outputs = [splitmix64((k * gamma) & ((1 << 64) - 1)) for k in range(3)]
    assert outputs == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_run_seeds_draw_different_batches_at_the_same_step_on_cpu():
    # mt19937 keeps a seed's low 32 bits: (seed << 32) + step alone gave every seed the same draws
    draws = {seed: torch.randint(10**6, (8,), generator=step_generator(seed, 7, CPU)) for seed in range(4)}
    assert len({tuple(d.tolist()) for d in draws.values()}) == 4


def test_the_same_seed_and_step_draw_the_same_numbers():
    a = torch.rand(5, generator=step_generator(3, 11, CPU))
    assert torch.equal(a, torch.rand(5, generator=step_generator(3, 11, CPU)))


def test_low_32_bits_are_distinct_over_seeds_steps_and_ranks():
    low = [mixed_seed(seed, step, rank) & 0xFFFFFFFF for seed in range(10) for step in range(100)
           for rank in (None, 0, 1, 2)]
    assert len(set(low)) == len(low)


def test_negative_and_large_seeds_give_valid_generators():
    for seed in (-1, -(2**40), 2**40):
        assert 0 <= mixed_seed(seed, 0) < 2**64
        torch.rand(1, generator=step_generator(seed, 0, CPU))
