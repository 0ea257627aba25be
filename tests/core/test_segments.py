import torch

from speedasr.core.segments import Segments


def test_from_lengths_with_empty_segment():
    seg = Segments.from_lengths([3, 0, 2])
    assert seg.cu_seqlens.dtype == torch.int32
    assert seg.cu_seqlens.tolist() == [0, 3, 3, 5]
    assert seg.offsets == [0, 3, 3, 5]
    assert seg.max_seqlen == 3 and seg.total == 5 and seg.batch_size == 3
    assert seg.positions.tolist() == [0, 1, 2, 0, 1]
    assert seg.segment_ids.tolist() == [0, 0, 0, 2, 2]


def test_pad_unpad_round_trip():
    seg = Segments.from_lengths([2, 3, 1])
    x = torch.arange(6 * 2, dtype=torch.float32).view(6, 2)
    padded = seg.pad(x, value=-1.0)
    assert padded.shape == (3, 3, 2)
    assert padded[0, 2].tolist() == [-1.0, -1.0]
    assert padded[1, 2].tolist() == x[4].tolist()
    assert torch.equal(seg.unpad(padded), x)
    assert seg.mask().tolist() == [[True, True, False], [True, True, True], [True, False, False]]
    assert [t.shape[0] for t in seg.split(x)] == [2, 3, 1]


def test_empty_batch():
    seg = Segments.from_lengths([])
    assert seg.max_seqlen == 0 and seg.total == 0 and seg.cu_seqlens.tolist() == [0]
