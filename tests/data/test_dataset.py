from pathlib import Path

import pytest
import torch
from lhotse import CutSet

from speedasr.core.batch import IGNORE_INDEX, PackedBatch, PaddedBatch
from speedasr.data.dataset import AsrDataset, SpecAugmentConfig, decoder_sequences
from speedasr.data.nemo_tokenizer import AggregateTokenizer
from speedasr.data.tokenizer import Tokenizer
from speedasr.errors import UserError
from speedasr.testing import make_tiny_cuts, tiny_texts

N_MELS = 80


@pytest.fixture(scope="module")
def cuts(tmp_path_factory):
    return make_tiny_cuts(tmp_path_factory.mktemp("cuts"), n=5, seed=3, durations=(0.3, 1.5))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer.train(tiny_texts(200, seed=1), tmp_path_factory.mktemp("tok"), vocab_size=120)


def test_decoder_sequences_shift_and_mask(tok):
    inp, tgt = decoder_sequences(tok, "the cat", "en")
    prompt, text = tok.prompt("en"), tok.encode("the cat")
    assert inp == prompt + text
    assert tgt == [IGNORE_INDEX] * (len(prompt) - 1) + text + [tok.eot_id]
    assert len(inp) == len(tgt)
    # each non-ignored target is the next decoder input (teacher forcing)
    assert tgt[len(prompt) - 1 : -1] == inp[len(prompt) :]


def test_packed_batch_matches_per_cut_features(cuts, tok):
    ds = AsrDataset(tok, n_mels=N_MELS, layout="packed")
    batch = ds[cuts]
    assert isinstance(batch, PackedBatch)
    assert batch.features.shape == (batch.feature_segments.total, N_MELS)
    assert batch.cut_ids == [c.id for c in cuts]
    for cut, x in zip(cuts, batch.feature_segments.split(batch.features), strict=False):
        alone = ds[CutSet.from_cuts([cut])].features
        assert torch.equal(x, alone)
        # ~100 frames per second (10 ms shift)
        assert abs(x.shape[0] - 100 * cut.duration) <= 2
        # normalized over the utterance's own frames
        assert torch.allclose(x.mean(0), torch.zeros(N_MELS), atol=1e-4)
    assert batch.token_segments.lengths == tuple(
        len(tok.prompt()) + len(tok.encode(c.supervisions[0].text)) for c in cuts
    )
    assert batch.prompt_lengths == (4,) * len(cuts)


def test_padded_layout_is_the_same_content(cuts, tok):
    packed = AsrDataset(tok, n_mels=N_MELS, layout="packed")[cuts]
    padded = AsrDataset(tok, n_mels=N_MELS, layout="padded")[cuts]
    assert isinstance(padded, PaddedBatch)
    b, t_max = len(cuts), packed.feature_segments.max_seqlen
    assert padded.features.shape == (b, t_max, N_MELS)
    again = padded.to_packed()
    assert torch.equal(again.features, packed.features)
    assert torch.equal(again.tokens, packed.tokens)
    assert torch.equal(again.targets, packed.targets)
    # padding positions: zero features, pad tokens, ignored targets
    mask = padded.token_segments.mask()
    assert (padded.tokens[~mask] == tok.pad_id).all()
    assert (padded.targets[~mask] == IGNORE_INDEX).all()


def test_spec_augment_changes_training_features_only(cuts, tok):
    torch.manual_seed(0)
    aug = AsrDataset(
        tok, n_mels=N_MELS, spec_augment=SpecAugmentConfig(num_frame_masks=2, frames_mask_size=20)
    )
    plain = AsrDataset(tok, n_mels=N_MELS)
    a, p = aug[cuts], plain[cuts]
    assert a.feature_segments.lengths == p.feature_segments.lengths
    assert not torch.equal(a.features, p.features)


def test_broken_audio_is_skipped_and_reported(cuts, tok, tmp_path):
    broken = cuts[0]
    path = tmp_path / "broken.flac"
    path.write_bytes(b"not audio at all")
    broken = broken.with_recording_path_prefix("")  # copy
    broken.recording.sources[0].source = str(path)
    batch = AsrDataset(tok, n_mels=N_MELS)[CutSet.from_cuts([broken, *list(cuts)[1:]])]
    assert batch.skipped_cut_ids == (broken.id,)
    assert batch.cut_ids == [c.id for c in list(cuts)[1:]]


NEMO = Path(__file__).parents[1] / "fixtures" / "nemo" / "canary_tiny.nemo"


@pytest.fixture(scope="module")
def canary_state():
    from speedasr.nemo.archive import read_nemo
    from speedasr.nemo.import_nemo import tokenizer_state

    return tokenizer_state(read_nemo(NEMO))


# (cut.custom["pnc"], the prompt's pnc token): absent -> NeMo's default <|pnc|>; NeMo's spellings
# of yes and no; a JSON true/0 read by lhotse as a Python bool/int.
PNC_CASES = [(None, "<|pnc|>"), ("yes", "<|pnc|>"), ("no", "<|nopnc|>"), ("false", "<|nopnc|>"),
             ("1", "<|pnc|>"), ("0", "<|nopnc|>"), (True, "<|pnc|>"), (0, "<|nopnc|>")]  # fmt: skip


@pytest.mark.parametrize("prompt_format", ["canary2", "canary"])
def test_canary_prompt_follows_the_cuts_pnc(cuts, canary_state, prompt_format):
    tok = AggregateTokenizer.from_state({**canary_state, "prompt_format": prompt_format})
    cut = cuts[0]
    batch_cuts = CutSet.from_cuts(
        cut.with_id(f"{cut.id}-{i}") if v is None else cut.with_id(f"{cut.id}-{i}").with_custom(
            "pnc", v)
        for i, (v, _) in enumerate(PNC_CASES)
    )  # fmt: skip
    batch = AsrDataset(tok, n_mels=N_MELS)[batch_cuts]
    # Ids of the fixture's spl_tokens pieces, read by hand (as in test_nemo_tokenizer.py):
    # <|startofcontext|> 7, <|startoftranscript|> 4, <|emo:undefined|> 8, <|en|> 21,
    # <|transcribe|> 19, <|pnc|> 5, <|nopnc|> 6, <|noitn|> 14, <|notimestamp|> 16,
    # <|nodiarize|> 18.
    ids = {"<|pnc|>": 5, "<|nopnc|>": 6}
    prompts = [t[:p].tolist() for t, p in zip(
        batch.token_segments.split(batch.tokens), batch.prompt_lengths, strict=True)]  # fmt: skip
    for prompt, (_, token) in zip(prompts, PNC_CASES, strict=True):
        if prompt_format == "canary2":
            assert prompt == [7, 4, 8, 21, 21, ids[token], 14, 16, 18]
        else:
            assert prompt == [4, 21, 19, 21, ids[token]]


def test_own_tokenizer_prompt_ignores_pnc(cuts, tok):
    """speedasr's own prompt stays <|nopnc|> whatever the cut says (its models learn text as
    written)."""
    cut = cuts[0]
    batch = AsrDataset(tok, n_mels=N_MELS)[CutSet.from_cuts([cut.with_custom("pnc", "yes")])]
    assert batch.tokens[:4].tolist() == [tok.sot_id, tok.id("<|en|>"), tok.id("<|transcribe|>"),
                                         tok.id("<|nopnc|>")]  # fmt: skip


def test_canary_pnc_value_nemo_refuses_names_the_cut(cuts, canary_state):
    tok = AggregateTokenizer.from_state(canary_state)
    bad = cuts[0].with_custom("pnc", "maybe")
    with pytest.raises(UserError, match=f"cut '{bad.id}': pnc 'maybe' is not one of NeMo's"):
        AsrDataset(tok, n_mels=N_MELS)[CutSet.from_cuts([bad])]
