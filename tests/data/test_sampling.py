import copy
import warnings
from collections import Counter

import pytest

from speedasr.bench.padding import synthetic_corpus
from speedasr.data.bucketing import BucketBins
from speedasr.data.manifests import metadata_only_cut as metadata_cut
from speedasr.data.sampling import SamplerConfig, build_sampler
from speedasr.errors import UserError

MODES = ["packed", "bucket2d", "bucket1d", "random"]


@pytest.fixture(scope="module")
def cuts():
    # ~1.5 h of long-tailed read speech with 0.3% misaligned transcripts, plus cuts that every
    # mode must reject with a reason: no supervision, and far longer than the budget.
    cs = list(synthetic_corpus(1.5, seed=3))
    cs.append(metadata_cut("too-long", 200.0, "a very long one", "en"))
    nosup = metadata_cut("no-sup", 3.0, "x", "en")
    nosup.supervisions = []
    cs.append(nosup)
    from lhotse import CutSet

    return CutSet.from_cuts(cs)


def cfg(mode, **kw):
    base = dict(mode=mode, max_duration=60.0, num_buckets=6, num_token_buckets=3, buffer_size=3000)
    base.update(kw)
    return SamplerConfig(**base)


def ids(batches):
    return [[c.id for c in b] for b in batches]


def epoch(sampler):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ids(sampler)


@pytest.mark.parametrize("mode", MODES)
def test_each_accepted_cut_once_and_rejects_counted(cuts, mode):
    sampler = build_sampler(cuts, cfg(mode), None)
    seen = [i for b in epoch(sampler) for i in b]
    counts = Counter(seen)
    assert max(counts.values()) == 1
    rej = sampler.rejected
    assert rej.counts["no_supervision"] == 1 and "no-sup" in rej.examples["no_supervision"]
    assert rej.counts["over_budget"] == 1 and "too-long" in rej.examples["over_budget"]
    assert len(seen) + rej.total == len(cuts)
    assert set(seen) | {i for ex in rej.examples.values() for i in ex} <= set(cuts.ids)
    if mode in ("packed", "bucket2d"):
        assert rej.counts["tps_outlier"] >= 1  # the misaligned transcripts
    assert "rejected" in rej.report()
    # A second epoch yields the same set again (rejections counted afresh).
    sampler.set_epoch(1)
    assert sorted(i for b in epoch(sampler) for i in b) == sorted(seen)
    assert len(seen) + sampler.rejected.total == len(cuts)


@pytest.mark.parametrize("mode", MODES)
def test_two_ranks_partition_the_epoch(cuts, mode):
    runs = [epoch(build_sampler(cuts, cfg(mode), None, world_size=2, rank=r)) for r in (0, 1)]
    assert len(runs[0]) == len(runs[1])  # equal step counts
    union = [i for run in runs for b in run for i in b if "_dup" not in i]
    assert len(union) == len(set(union))
    single = build_sampler(cuts, cfg(mode), None)
    assert set(union) == {i for b in epoch(single) for i in b}
    # lhotse gives every rank a batch at the last step: when fewer cuts than ranks are left, it
    # repeats one, marked "_dup" in its id; never before the last step.
    dups = [(step, i) for run in runs for step, b in enumerate(run) for i in b if "_dup" in i]
    assert all(step == len(runs[0]) - 1 for step, _ in dups) and len(dups) < 2


def test_ranks_draw_from_the_same_bucket(cuts):
    samplers = [build_sampler(cuts, cfg("bucket2d"), None, world_size=2, rank=r) for r in (0, 1)]
    runs = [epoch(s) for s in samplers]
    constraint = samplers[0].constraint
    by_id = {c.id: c for c in cuts}
    same = [
        constraint.measure(by_id[a[0]])[2] == constraint.measure(by_id[b[0]])[2]
        for a, b in zip(runs[0][:-1], runs[1][:-1], strict=True)
    ]
    # Best effort (lhotse scans to a neighbour when the drawn bucket has one batch left).
    assert sum(same) >= 0.7 * len(same)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("world_size", [1, 2])
def test_exact_resume_mid_epoch(cuts, mode, world_size):
    c = cfg(mode)
    full = build_sampler(cuts, c, None, world_size=world_size, rank=0, seed=7)
    full.set_epoch(1)
    expected = epoch(full)
    assert len(expected) > 6
    first = build_sampler(cuts, c, None, world_size=world_size, rank=0, seed=7)
    first.set_epoch(1)
    it = iter(first)
    head = [[x.id for x in next(it)] for _ in range(5)]
    state = copy.deepcopy(first.state_dict())
    rejected_then = first.rejected.total
    resumed = build_sampler(cuts, c, None, world_size=world_size, rank=0, seed=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed.load_state_dict(state)
    assert head + epoch(resumed) == expected
    assert resumed.rejected.total >= rejected_then


def test_resume_restores_saved_configuration(cuts):
    full = epoch(build_sampler(cuts, cfg("packed"), None))
    first = build_sampler(cuts, cfg("packed"), None)
    it = iter(first)
    for _ in range(3):
        next(it)
    state = first.state_dict()
    # Resumed with another budget in the config: the saved one wins, with a warning.
    other = build_sampler(cuts, cfg("packed", max_duration=90.0), None)
    with pytest.warns(UserWarning, match="different batching configuration"):
        other.load_state_dict(state)
    assert other.constraint.cost.max_duration == 60.0
    assert epoch(other) == full[3:]
    other.load_state_dict(state)  # the state dict is not consumed by loading
    assert epoch(other) == full[3:]


def test_bins_are_cached(cuts, tmp_path):
    path = tmp_path / "bins.json"
    a = build_sampler(cuts, cfg("bucket2d", bins=str(path)), None)
    assert path.is_file()
    mtime = path.stat().st_mtime_ns
    b = build_sampler(cuts, cfg("packed", bins=str(path), num_buckets=2), None)
    assert path.stat().st_mtime_ns == mtime  # reused, not re-estimated
    assert b.constraint.bins.shapes() == a.constraint.bins.shapes()


def test_cuts_longer_than_the_bins_are_rejected(cuts):
    bins = BucketBins([10.0, 20.0], [[60], [400]], [20.0, 20.0])
    s = build_sampler(cuts, cfg("packed"), None, bins=bins)
    seen = [i for b in epoch(s) for i in b]
    n_long = sum(1 for c in cuts if c.duration > 20.0)
    assert s.rejected.counts["too_long"] == n_long > 1
    assert len(seen) + s.rejected.total == len(cuts)


def test_lenient_mode_rejects_no_tps_outlier(cuts):
    s = build_sampler(cuts, cfg("bucket2d", strict=False), None)
    epoch(s)
    assert "tps_outlier" not in s.rejected.counts


def test_padded_2d_respects_batch_sizes(cuts):
    bins = BucketBins([10.0, 40.0], [[60], [400]], [20.0, 20.0])
    sampler = build_sampler(cuts, cfg("bucket2d", batch_sizes=[7, 2]), None, bins=bins)
    by_id = {c.id: c for c in cuts}
    sizes = Counter()
    for b in epoch(sampler):
        bucket = 1 if by_id[b[0]].duration > 10.0 else 0
        assert all((by_id[i].duration > 10.0) == bucket for i in b)  # one bucket per batch
        assert len(b) <= (7, 2)[bucket]
        sizes[bucket, len(b)] += 1
    assert sizes[0, 7] > 0 and sizes[1, 2] > 0  # full batches have exactly the bucket's size


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(mode="bogus"), "mode"),
        (dict(max_duration=0), "max_duration"),
        (dict(mode="packed", batch_sizes=[1]), "batch_sizes"),
        (dict(mode="bucket2d", quadratic_cross=10.0), "packed mode only"),
        (dict(mode="random", max_tokens=100), "max_tokens"),
        (dict(num_token_buckets=0), "num_token_buckets"),
        (dict(mode="bucket2d", batch_sizes=[1, 2, 3]), "one per bucket"),
    ],
)
def test_invalid_config_is_a_user_error(cuts, kw, match):
    with pytest.raises(UserError, match=match):
        build_sampler(cuts, cfg(**{"mode": "packed", **kw}), None)


def test_lazy_endless_cutset(cuts, tmp_path):
    from lhotse import CutSet

    path = tmp_path / "cuts.jsonl.gz"
    CutSet.from_cuts(list(cuts)[:300]).to_file(path)
    endless = CutSet.from_file(path).repeat()  # lazy and infinite: bins from the first cuts
    sampler = build_sampler(endless, cfg("packed", num_cuts_for_bins_estimate=200), None)
    it = iter(sampler)
    assert all(len(next(it)) > 0 for _ in range(20))
