import warnings

import pytest
from lhotse import CutSet

from speedasr.bench.padding import synthetic_corpus
from speedasr.core.geometry import num_input_frames
from speedasr.data.bucketing import BucketBins, TokenCounter
from speedasr.data.manifests import metadata_only_cut as metadata_cut
from speedasr.data.packing import PackingConstraint, PackingCost
from speedasr.data.padding import PaddingStats, batch_padding
from speedasr.data.sampling import SamplerConfig, build_sampler


@pytest.fixture(scope="module")
def cuts():
    return synthetic_corpus(3.0, seed=5)


def batches(sampler):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [list(b) for b in sampler]


def test_cost_terms():
    cost = PackingCost(
        max_duration=100.0, quadratic_duration=20.0, quadratic_cross=50.0, quadratic_tokens=40.0
    )
    assert cost.audio(10.0, 25) == pytest.approx(10 + 100 / 20 + 10 * 25 / 50)
    assert cost.tokens(40) == pytest.approx(80.0)  # doubles at the quadratic constant
    assert PackingCost(max_duration=5.0).audio(3.0, 999) == 3.0
    with pytest.raises(ValueError, match="max_duration"):
        PackingCost(max_duration=0.0)


def test_constraint_never_exceeds_and_reserves_the_bucket_corner():
    bins = BucketBins([4.0, 8.0], [[40], [80]], [10.0, 10.0])
    c = PackingConstraint(bins, TokenCounter(), PackingCost(max_duration=20.0))
    small = [metadata_cut(f"s{i}", 3.0, "ab", "en") for i in range(10)]
    n = 0
    for cut in small:
        c.add(cut)
        n += 1
        if c.close_to_exceeding():
            break
    # bucket 0 holds cuts up to 4 s: stop once a 4 s cut might not fit (15 s + 4 s fits, 18 doesn't)
    assert n == 6 and not c.exceeded() and c.audio_cost == pytest.approx(18.0)
    assert c.can_add(metadata_cut("t", 2.0, "ab", "en"))
    assert not c.can_add(metadata_cut("u", 2.5, "ab", "en"))
    assert c.reject_reason(metadata_cut("big", 7.9, "ab", "en")) is None
    tight = PackingConstraint(bins, TokenCounter(), PackingCost(max_duration=5.0))
    assert tight.reject_reason(metadata_cut("big", 7.9, "ab", "en")) == "over_budget"


@pytest.mark.parametrize(
    "cost",
    [
        dict(),
        dict(quadratic_duration=15.0, quadratic_cross=200.0),
        dict(max_tokens=900, quadratic_tokens=100.0),
    ],
)
def test_packed_batches_fill_the_budget_with_zero_padding(cuts, cost):
    budget = 120.0
    cfg = SamplerConfig(max_duration=budget, num_buckets=6, num_token_buckets=3, **cost)
    sampler = build_sampler(cuts, cfg, None)
    pc, counter = sampler.constraint.cost, TokenCounter()
    stats, got = PaddingStats(), batches(sampler)
    for b in got:
        d, t = [c.duration for c in b], [counter(c) for c in b]
        assert sum(pc.audio(x, n) for x, n in zip(d, t, strict=True)) <= budget + 1e-9
        if pc.max_tokens is not None:
            assert sum(pc.tokens(n) for n in t) <= pc.max_tokens
        stats += batch_padding([num_input_frames(x) for x in d], t, packed=True)
    assert all(v == 0.0 for v in stats.fractions().values())  # structural, exactly zero
    assert stats.utterances + sampler.rejected.total == len(cuts)
    if not cost:
        # Linear budget: nearly all of it is real audio (only the last batch may be short).
        real = sum(c.duration for b in got for c in b) / len(got)
        assert real >= 0.95 * budget


def test_mixing_buckets_at_the_end_of_the_epoch(cuts):
    cfg = SamplerConfig(max_duration=120.0, num_buckets=6, num_token_buckets=3)
    mixed = batches(build_sampler(cuts, cfg, None))
    unmixed = batches(
        build_sampler(cuts, SamplerConfig(**{**cfg.__dict__, "mix_buckets": False}), None)
    )
    assert len(mixed) < len(unmixed)
    assert sorted(c.id for b in mixed for c in b) == sorted(c.id for b in unmixed for c in b)


def test_single_cut_and_tiny_corpus():
    one = CutSet.from_cuts([metadata_cut("only", 2.0, "hello", "en")])
    got = batches(build_sampler(one, SamplerConfig(max_duration=30.0), None))
    assert [[c.id for c in b] for b in got] == [["only"]]
