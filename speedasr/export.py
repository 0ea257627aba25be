"""Export a model for use outside speedasr: ``speedasr export --ckpt CKPT --out DIR``.

Exporters and runtimes want dense tensors, so the export wraps the model in padded-input modules
whose only batch descriptor is a lengths tensor:

- ``PaddedEncoder``: ``features (B, T, n_mels)`` float32, ``lengths (B,)`` int64 ->
  ``encoder_out (B, T', D)``, ``encoder_lengths (B,)`` int64 and, for models with a CTC head,
  ``ctc_log_probs (B, T', V)`` float32. Rows past ``encoder_lengths[b]`` are padding (ignore them).
- ``PaddedDecoder``: ``tokens (B, L)`` int64, ``token_lengths (B,)``, ``encoder_out``,
  ``encoder_lengths`` -> ``logits (B, L, V)``: the decoder over whole prefixes (no KV cache), one
  call per greedy step.

The modules reuse the model's own layers (``ConformerBlock``, ``TransformerDecoder``) through a
layout whose masks, positions and attention masks are computed from the lengths *tensor*: speedasr's
``PaddedLayout`` reads host-int lengths, which an exporter would bake in as constants of the one
example batch. Both are written with ``torch.export`` (dynamic batch size and lengths) to
``DIR/encoder.pt2`` and ``DIR/decoder.pt2``, loaded by plain ``torch.export.load`` (torch's
successor to TorchScript, whose ``torch.jit.trace`` warns that it is deprecated in torch 2.13),
beside ``DIR/tokenizer.model`` (sentencepiece) and ``DIR/export.json`` (features, special ids,
prompts). docs/api.md has a plain-torch script that greedy-decodes with these files.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from speedasr.core.geometry import SAMPLE_RATE
from speedasr.errors import UserError
from speedasr.nn.attention_torch import masked_sdpa, relative_score_mask
from speedasr.nn.relpos import relative_sinusoids
from speedasr.nn.rotary import rotary_tables

FEATURES = (
    "lhotse Fbank(FbankConfig(num_mel_bins=n_mels)) of 16 kHz mono audio (10 ms frames), then "
    "per utterance and bin: (x - mean) / (std + 1e-5) over the utterance's frames"
)
"""What ``PaddedEncoder`` reads (``speedasr.data.dataset.AsrDataset.features``), for export.json."""


MIN_FRAMES = 9
"""Frames the exported encoder needs in its input (pad a batch of shorter features to 9)."""


class LengthsLayout:
    """``speedasr.nn.layout.PaddedLayout`` with ``lengths (B,)`` as a tensor: tensors are
    ``(B, T, ...)`` and every sequence starts at position 0; nothing reads a host int."""

    packed = False

    def __init__(self, lengths: torch.Tensor, length: int) -> None:
        self.lengths, self.length = lengths, length

    @property
    def positions(self) -> torch.Tensor:
        """``(T,)`` int64 ``0..T-1`` (broadcasts over B)."""
        return torch.arange(self.length, device=self.lengths.device)

    @property
    def mask(self) -> torch.Tensor:
        """``(B, T)`` bool, True at real positions."""
        return self.positions[None] < self.lengths[:, None]

    def rotary(self, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
        return rotary_tables(self.positions, head_dim, base)

    def relative_sinusoids(self, dim: int) -> torch.Tensor:
        """``(2T - 1, dim)``: the relative-position table (``speedasr.nn.relpos``)."""
        return relative_sinusoids(self.length, dim, self.lengths.device)

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: LengthsLayout, causal: bool,
        rel_pos: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """``q: (B, Tq, H, D)``, ``k, v: (B, Tk, H, D)`` -> ``(B, Tq, H, D)``; causal is
        bottom-right aligned, rows that see no key are zero (``dense_attention_mask``'s rules);
        ``rel_pos``: the relative-position term (``speedasr.nn.attention_torch``)."""
        lq, lk = self.lengths[:, None, None], keys.lengths[:, None, None]
        qpos, kpos = self.positions[None, :, None], keys.positions[None, None, :]
        mask = kpos < lk
        if causal:
            mask = mask & (kpos <= qpos + lk - lq)
        mask = mask[:, None]  # (B, 1, Tq, Tk)
        has_key = mask.any(dim=-1, keepdim=True)
        scale = 1.0 / math.sqrt(q.shape[-1])
        mask = mask | ~has_key
        if rel_pos is not None:
            mask = relative_score_mask(
                rel_pos[0].transpose(1, 2), rel_pos[1], k.shape[1], scale, mask
            )
        out = masked_sdpa(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, has_key, scale
        )
        return out.transpose(1, 2)

    def depthwise_conv(self, x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
        """``(B, T, C) -> (B, T, C)``; padding frames are zeroed first (the zeros each sequence
        sees at its edges when alone)."""
        x = x * self.mask[..., None].to(x.dtype)
        return conv(x.transpose(1, 2)).transpose(1, 2)


class PaddedEncoder(nn.Module):
    """Encoder (+ CTC head) of an ``AEDModel`` on padded features; see the module docstring."""

    def __init__(self, model) -> None:
        super().__init__()
        self.encoder, self.ctc_head = model.encoder, model.ctc_head

    def forward(self, features: torch.Tensor, lengths: torch.Tensor):
        sub = self.encoder.subsampling  # either kind: both take tensor lengths
        x, lengths = sub.forward_lengths(features.to(sub.out.weight.dtype), lengths)
        x = x * self.encoder.xscale  # (B, T', D)
        layout = LengthsLayout(lengths, x.shape[1])
        for block in self.encoder.blocks:
            x = block(x, layout)
        x = self.encoder.norm(x)
        if self.ctc_head is None:
            return x, lengths
        return x, lengths, F.log_softmax(self.ctc_head(x).float(), dim=-1)


class PaddedDecoder(nn.Module):
    """Decoder of an ``AEDModel`` over padded token prefixes; see the module docstring."""

    def __init__(self, model) -> None:
        super().__init__()
        self.decoder = model.decoder

    def forward(
        self,
        tokens: torch.Tensor,
        token_lengths: torch.Tensor,
        encoder_out: torch.Tensor,
        encoder_lengths: torch.Tensor,
    ) -> torch.Tensor:
        tok = LengthsLayout(token_lengths, tokens.shape[1])
        enc = LengthsLayout(encoder_lengths, encoder_out.shape[1])
        return self.decoder.logits(self.decoder.hidden(tokens, tok, encoder_out, enc)).float()


def example_inputs(model, lengths: tuple[int, ...] = (203, 131, 77)) -> tuple:
    """Encoder and decoder example inputs of different lengths (an exporter needs one batch)."""
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(len(lengths), max(lengths), model.cfg.n_mels, generator=generator)
    lens = torch.tensor(lengths)
    with torch.no_grad():
        enc, enc_lens, *_ = PaddedEncoder(model)(features, lens)
    tokens = torch.ones(len(lengths), 6, dtype=torch.int64)
    return (features, lens), (tokens, torch.tensor([6, 5, 4]), enc, enc_lens)


def export_programs(model) -> tuple[torch.export.ExportedProgram, torch.export.ExportedProgram]:
    """``torch.export`` programs of ``PaddedEncoder(model)`` and ``PaddedDecoder(model)`` in
    float32, with dynamic batch size, frames and tokens."""
    from torch.export import Dim

    model = model.float().eval()
    # The lower bounds are torch.export's: sizes 0 and 1 are specialized, so the longest features
    # of a batch need 9 frames (2 encoder frames) and prefixes 2 tokens (a prompt has 4).
    batch, tokens = Dim("batch"), Dim("tokens", min=2)
    frames, enc_frames = Dim("frames", min=MIN_FRAMES), Dim("enc_frames", min=2)
    enc_args, dec_args = example_inputs(model)
    with torch.no_grad():
        encoder = torch.export.export(
            PaddedEncoder(model).eval(), enc_args,
            dynamic_shapes=({0: batch, 1: frames}, {0: batch}),
        )  # fmt: skip
        decoder = torch.export.export(
            PaddedDecoder(model).eval(), dec_args,
            dynamic_shapes=(
                {0: batch, 1: tokens}, {0: batch}, {0: batch, 1: enc_frames}, {0: batch}
            ),
        )  # fmt: skip
    return encoder, decoder


def export_model(model, tokenizer, out_dir: str | Path) -> dict:
    """Write ``encoder.pt2``, ``decoder.pt2``, ``tokenizer.model`` and ``export.json`` to
    ``out_dir``; returns what export.json holds."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoder, decoder = export_programs(model)
    torch.export.save(encoder, out / "encoder.pt2")
    torch.export.save(decoder, out / "decoder.pt2")
    (out / "tokenizer.model").write_bytes(tokenizer.sp.serialized_model_proto())
    meta = {
        "format": "torch.export (load with torch.export.load(path).module())",
        "torch_version": torch.__version__,
        "sample_rate": SAMPLE_RATE,
        "n_mels": model.cfg.n_mels,
        "features": FEATURES,
        "encoder_outputs": ["encoder_out", "encoder_lengths"]
        + (["ctc_log_probs"] if model.ctc_head is not None else []),
        "blank_id": model.cfg.pad_id,
        "eot_id": tokenizer.eot_id,
        "special_ids": sorted(tokenizer.special_ids()),
        "prompts": {lang: tokenizer.prompt(lang) for lang in tokenizer.languages},
        "max_tokens": "8 + 0.8 per encoder frame (speedasr's default length guard)",
    }
    (out / "export.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


# --- command line ---------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", required=True, help="checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, help="directory for encoder.pt2, decoder.pt2 ...")


def run(args: argparse.Namespace) -> int:
    from speedasr.checkpoint import load_model

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' exists and is not a directory")
    loaded = load_model(args.ckpt)
    if loaded.config.frontend != "lhotse" or not hasattr(loaded.tokenizer, "sp"):
        raise UserError(
            f"{args.ckpt}: speedasr export does not yet write models imported from NeMo (their "
            "NeMo front end and aggregate tokenizer are not part of the export)"
        )
    meta = export_model(loaded.model, loaded.tokenizer, out)
    print(
        f"exported {args.ckpt} (step {loaded.step}) to {out}/: encoder.pt2 -> "
        f"{', '.join(meta['encoder_outputs'])}; decoder.pt2 -> logits; tokenizer.model; "
        "export.json (docs/api.md: decoding without speedasr)"
    )
    return 0
