import math

import pytest
import torch

from speedasr.core.segments import Segments
from speedasr.nn.decoder import TransformerDecoder
from speedasr.nn.layout import PackedLayout
from speedasr.nn.positions import sinusoidal_positions


def test_table_by_hand():
    table = sinusoidal_positions(torch.tensor([0, 1, 7]), 4)
    # channels: sin(p), cos(p), sin(p / 100), cos(p / 100)  (10000^(2/4) = 100)
    for row, p in zip(table, (0, 1, 7), strict=True):
        expected = [math.sin(p), math.cos(p), math.sin(p / 100), math.cos(p / 100)]
        torch.testing.assert_close(row, torch.tensor(expected), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="even width"):
        sinusoidal_positions(torch.arange(3), 5)


def decoder(**options) -> TransformerDecoder:
    torch.manual_seed(0)
    return TransformerDecoder(
        vocab_size=20, d_model=8, layers=1, heads=2, d_ff=16, dropout=0.0, memory_dim=8, **options
    ).eval()


def test_positions_restart_per_utterance_and_reach_both_inputs():
    seg = Segments.from_lengths([3, 2])
    tokens = torch.tensor([4, 5, 6, 7, 8])
    with_positions = decoder(token_positions=True, memory_positions=True)
    x = with_positions.embed_tokens(tokens, seg.positions)
    raw = with_positions.embed(tokens) + sinusoidal_positions(seg.positions, 8) / math.sqrt(8)
    torch.testing.assert_close(x, with_positions.embed_norm(raw))
    memory = torch.randn(5, 8)
    table = sinusoidal_positions(torch.tensor([0, 1, 2, 0, 1]), 8)
    torch.testing.assert_close(with_positions.project_memory(memory, seg.positions), memory + table)
    # Off (the default), the embedding and memory reach the blocks unchanged.
    plain = decoder()
    assert plain.embed_norm is None
    torch.testing.assert_close(plain.embed_tokens(tokens, seg.positions), plain.embed(tokens))
    torch.testing.assert_close(plain.project_memory(memory, seg.positions), memory)
    layout = PackedLayout(seg, "torch")
    assert not torch.allclose(
        with_positions.hidden(tokens, layout, memory, layout),
        plain.hidden(tokens, layout, memory, layout),
    )


def test_token_position_scale_multiplies_the_sinusoids_before_the_norm():
    seg = Segments.from_lengths([4, 1])
    tokens = torch.tensor([3, 9, 9, 2, 5])
    unscaled = decoder(token_positions=True, token_position_scale=1.0)
    raw = unscaled.embed(tokens) + sinusoidal_positions(torch.tensor([0, 1, 2, 3, 0]), 8)
    expected = unscaled.embed_norm(raw)
    torch.testing.assert_close(unscaled.embed_tokens(tokens, seg.positions), expected)
    canary = decoder(token_positions=True)  # same weights (seed 0), default scale 1 / sqrt(8)
    assert not torch.allclose(
        canary.embed_tokens(tokens, seg.positions), unscaled.embed_tokens(tokens, seg.positions)
    )
