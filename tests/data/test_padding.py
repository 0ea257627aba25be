import pytest

from speedasr.core.geometry import encoder_length, num_input_frames
from speedasr.data.padding import PaddingStats, batch_padding


def test_encoder_length_is_ceil_at_each_stage():
    assert [encoder_length(t) for t in (0, 1, 2, 8, 9, 16, 17)] == [0, 1, 1, 1, 2, 2, 3]
    # ceil(ceil(ceil(T/2)/2)/2) equals ceil(T/8)
    assert all(encoder_length(t) == -(-t // 8) for t in range(200))


def test_num_input_frames():
    assert num_input_frames(1.0) == 100
    assert num_input_frames(0.0149) == 1


def test_padded_batch_hand_computed():
    # frames 80 and 160 -> encoder 10 and 20; tokens 5 and 10
    s = batch_padding([80, 160], [5, 10], packed=False)
    f = s.fractions()
    assert f["padding_frames"] == pytest.approx(1 - 240 / 320)
    assert f["padding_encoder_frames"] == pytest.approx(1 - 30 / 40)
    assert f["padding_tokens"] == pytest.approx(1 - 15 / 20)
    real = (100 + 400) + (25 + 100) + (5 * 10 + 10 * 20)
    computed = 2 * 400 + 2 * 100 + 2 * 10 * 20
    assert f["padding_attention"] == pytest.approx(1 - real / computed)


def test_packed_has_zero_padding_and_stats_add():
    s = batch_padding([80, 160, 7], [5, 10, 1], packed=True)
    assert all(v == 0.0 for v in s.fractions().values())
    total = s + batch_padding([80, 160], [5, 10], packed=False)
    assert total.batches == 2 and total.utterances == 5
    assert total.frames_real == 80 + 160 + 7 + 240
    assert PaddingStats().fractions()["padding_frames"] == 0.0


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError):
        batch_padding([1, 2], [1], packed=True)
