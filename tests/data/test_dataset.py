import pytest
import torch
from lhotse import CutSet

from speedasr.data.batch import IGNORE_INDEX, PackedBatch, PaddedBatch
from speedasr.data.dataset import AsrDataset, SpecAugmentConfig, decoder_sequences
from speedasr.data.tokenizer import Tokenizer
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
