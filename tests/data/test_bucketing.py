import gzip
import json
import math

import numpy as np
import pytest
from lhotse import CutSet, MonoCut

from speedasr.bench.padding import synthetic_corpus
from speedasr.cli import main
from speedasr.data.bucketing import (
    PROMPT_TOKENS,
    BucketBins,
    TokenCounter,
    estimate_bins,
    estimate_text_tokens,
)
from speedasr.data.constraints import Bucket2DConstraint
from speedasr.data.manifests import metadata_only_cut as metadata_cut
from speedasr.data.tokenizer import Tokenizer
from speedasr.errors import UserError


def long_tailed_lengths(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    d = np.clip(rng.lognormal(math.log(6), 0.63, n), 0.5, 30)
    return [(float(x), int(4 + round(x * rng.normal(8, 1)))) for x in d]


def test_bins_split_duration_then_tokens():
    lengths = long_tailed_lengths()
    bins = estimate_bins(lengths, 10, 4)
    assert len(bins.duration_edges) == 10
    assert bins.num_buckets <= 40 and all(1 <= len(r) <= 4 for r in bins.token_edges)
    # Equal total duration per duration bucket (within one long cut).
    d = np.array([x for x, _ in lengths])
    which = np.searchsorted(bins.duration_edges, d, side="left")
    totals = np.bincount(which, weights=d)
    assert totals.max() - totals.min() < 2 * 30
    # Every cut lands in a bucket whose corner holds it.
    for x, t in lengths[:500]:
        k = bins.assign(x, t, strict=False)
        dd, tt = bins.bucket_shape(k)
        assert x <= dd and t <= tt


def test_tps_outliers_are_excluded_and_rejected_in_strict_mode():
    lengths = [(5.0 + i * 1e-3, 40) for i in range(200)] + [(5.1, 400)]  # one misaligned text
    bins = estimate_bins(lengths, 1, 2)
    assert bins.meta["tps_outliers"] == 1
    assert bins.max_tps[0] == pytest.approx(40 / 5.0)
    assert bins.assign(5.1, 400, strict=True) == "tps_outlier"
    assert bins.assign(5.1, 400, strict=False) == "too_many_tokens"
    assert bins.assign(99.0, 10) == "too_long"
    assert isinstance(bins.assign(5.1, 40), int)  # within max TPS: fits the last sub-bucket


def test_lenient_takes_smallest_bucket_fitting_both():
    bins = BucketBins([5.0, 10.0], [[20, 40], [40, 90]], [8.0, 9.0])
    assert bins.assign(4.0, 60, strict=False) == 3  # too many tokens for row 0 -> row 1, sub 1
    assert bins.assign(4.0, 60, strict=True) == "tps_outlier"
    assert bins.assign(4.0, 30, strict=True) == 1


def test_degenerate_inputs():
    one = estimate_bins([(3.0, 12)], 30, 5)
    assert one.num_buckets == 1 and one.duration_edges == [3.0]
    assert one.assign(3.0, 12) == 0
    equal = estimate_bins([(4.0, 10 + i % 7) for i in range(100)], 30, 3)
    assert len(equal.duration_edges) == 1 and 1 <= equal.num_buckets <= 3
    no_text = estimate_bins([(2.0, 0), (3.0, 0)], 2, 2)  # zero tokens must not crash
    assert no_text.num_buckets >= 1
    with pytest.raises(UserError, match="no cut"):
        estimate_bins([], 10, 2)
    with pytest.raises(UserError, match="no cut"):
        estimate_bins([(0.0, 5)], 10, 2)
    with pytest.raises(UserError, match="at least 1"):
        estimate_bins([(1.0, 5)], 0, 2)


def test_bins_round_trip_and_bad_file(tmp_path):
    bins = estimate_bins(long_tailed_lengths(300), 4, 3)
    bins.save(tmp_path / "bins.json")
    again = BucketBins.load(tmp_path / "bins.json")
    assert again.shapes() == bins.shapes() and again.max_tps == bins.max_tps
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(UserError, match="not valid"):
        BucketBins.load(tmp_path / "bad.json")
    with pytest.raises(UserError, match="does not exist"):
        BucketBins.load(tmp_path / "missing.json")


def test_token_estimate_without_tokenizer():
    assert estimate_text_tokens("") == 0
    assert estimate_text_tokens("abcdef") == 2
    assert estimate_text_tokens("你好世界") == 4
    cut = metadata_cut("c", 1.0, "hello world", "en")
    assert TokenCounter()(cut) == PROMPT_TOKENS + math.ceil(11 / 3)


def test_token_counter_matches_collator(tmp_path):
    tok = Tokenizer.train(["hello world", "the cat sat on the mat"] * 20, tmp_path / "tok", 64)
    cut = metadata_cut("c", 1.0, "the cat sat", "en")
    assert TokenCounter(tok)(cut) == len(tok.prompt("en")) + len(tok.encode("the cat sat"))


def test_padded_constraint_budget():
    bins = BucketBins([5.0, 10.0], [[50], [100]], [10.0, 10.0])
    cuts = [metadata_cut(f"c{i}", 4.0, "x", "en") for i in range(10)]
    c = Bucket2DConstraint(bins, TokenCounter(), max_duration=20.0)
    for n, cut in enumerate(cuts, start=1):  # noqa: B007 (n is checked after the loop)
        c.add(cut)
        if c.close_to_exceeding():
            break
    assert n == 5 and not c.exceeded()  # 5 x 4 s = 20 s padded
    fixed = Bucket2DConstraint(bins, TokenCounter(), batch_sizes=[3, 1])
    for cut in cuts[:3]:
        fixed.add(cut)
    assert fixed.close_to_exceeding() and not fixed.exceeded()
    with pytest.raises(ValueError, match="one per bucket"):
        Bucket2DConstraint(bins, TokenCounter(), batch_sizes=[3])


def test_bins_command(tmp_path, capsys):
    cuts = synthetic_corpus(0.5, seed=1)
    path = tmp_path / "cuts.jsonl.gz"
    cuts.to_file(path)
    out = tmp_path / "bins.json"
    assert main(["bins", "--cuts", str(path), "--out", str(out), "--num-buckets", "6"]) == 0
    data = json.loads(out.read_text())
    assert data["format"] == "speedasr-bins-2d" and len(data["buckets"]) == 6
    assert data["meta"]["tokens"] == "estimate" and data["meta"]["num_cuts"] == len(cuts)
    assert "buckets" in capsys.readouterr().out
    # Clear errors, exit code 2.
    assert main(["bins", "--cuts", str(tmp_path / "nope.jsonl.gz"), "--out", str(out)]) == 2
    bad = tmp_path / "bad.jsonl.gz"
    with gzip.open(bad, "wt") as f:
        f.write("not json\n")
    assert main(["bins", "--cuts", str(bad), "--out", str(out)]) == 2
    empty = tmp_path / "nosup.jsonl.gz"
    first = next(iter(cuts))
    CutSet.from_cuts([MonoCut("x", 0.0, 1.0, 0, recording=first.recording)]).to_file(empty)
    assert main(["bins", "--cuts", str(empty), "--out", str(out)]) == 2
    assert "no cut" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:You are using DynamicBucketingSampler")
def test_constraint_works_in_stock_lhotse_sampler():
    from lhotse.dataset import DynamicBucketingSampler

    cuts = synthetic_corpus(0.5, seed=4)
    counter = TokenCounter()
    bins = estimate_bins([(c.duration, counter(c)) for c in cuts], 4, 3)
    constraint = Bucket2DConstraint(bins, counter, max_duration=60.0)
    sampler = DynamicBucketingSampler(
        cuts, constraint=constraint, duration_bins=list(range(bins.num_buckets - 1))
    )
    sampler.filter(lambda c: constraint.reject_reason(c) is None)
    seen = [c.id for b in sampler for c in b]
    accepted = [c.id for c in cuts if constraint.reject_reason(c) is None]
    assert sorted(seen) == sorted(accepted)


def test_speedasr_padded_batches_never_exceed_the_budget():
    from speedasr.data.sampling import SamplerConfig, build_sampler

    cuts = synthetic_corpus(1.0, seed=6)
    cfg = SamplerConfig(mode="bucket2d", max_duration=45.0, max_tokens=400, num_buckets=4)
    counter = TokenCounter()
    for batch in build_sampler(cuts, cfg, None):
        assert len(batch) * max(c.duration for c in batch) <= 45.0 + 1e-9
        assert len(batch) * max(counter(c) for c in batch) <= 400


def test_token_counter_encodes_each_language_with_its_model():
    """A two-language NeMo aggregate tokenizer (the fixture's spl_tokens + en, and a de model
    trained here): a de cut's text is counted with the de model, as the dataset encodes it."""
    import io
    from pathlib import Path

    import sentencepiece as spm

    from speedasr.data.dataset import decoder_sequences
    from speedasr.data.nemo_tokenizer import AggregateTokenizer
    from speedasr.nemo.archive import read_nemo
    from speedasr.nemo.import_nemo import tokenizer_state

    state = tokenizer_state(read_nemo(Path(__file__).parents[1] / "fixtures/nemo/canary_tiny.nemo"))
    de_proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["der hund ist gross", "die katze ist klein"] * 50),
        model_writer=de_proto,
        vocab_size=20,
        minloglevel=2,
    )
    tok = AggregateTokenizer.from_state(
        {**state, "langs": [*state["langs"], ["de", de_proto.getvalue()]]}
    )
    de = spm.SentencePieceProcessor(model_proto=de_proto.getvalue())
    en = dict(tok.models)["en"]
    text = "der hund ist gross"
    assert len(de.encode(text)) != len(en.encode(text))  # the two models disagree on this text
    counter = TokenCounter(tok)
    for cut, lang in [
        (metadata_cut("d", 1.0, text, "de"), "de"),
        (metadata_cut("e", 1.0, text, "en"), "en"),
        (metadata_cut("n", 1.0, text, None), "en"),  # no language: "en", as the dataset says
    ]:
        sp = de if lang == "de" else en
        assert counter(cut) == tok.prompt_length + len(sp.encode(text))  # 9 + that model's pieces
        assert counter(cut) == len(decoder_sequences(tok, text, lang)[0])  # the collator's L
