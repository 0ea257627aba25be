"""``speedasr export``: the exported programs against the packed model, and the plain-torch
decoding script of docs/api.md against ``speedasr.load(...).transcribe``.

One export (tens of seconds: ``torch.export`` traces both programs) serves every test. The model
is untrained, with the options that add code paths to the wrappers: a CTC head, sinusoidal token
and memory positions, and a decoder wider than the encoder (a memory projection).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import soundfile as sf
import torch
from torch.nn.utils.rnn import pad_sequence

import speedasr
from speedasr.cli import main
from speedasr.core.segments import Segments
from speedasr.testing import make_tiny_cuts, write_untrained_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(checkpoint, export dir, the loaded model, the two exported modules, stdout of export)."""
    root = tmp_path_factory.mktemp("export")
    ckpt = write_untrained_checkpoint(
        root, seed=1, decoder_d_model=48, absolute_token_positions=True,
        absolute_memory_positions=True,
    )  # fmt: skip
    out = root / "exported"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["export", "--ckpt", str(ckpt), "--out", str(out)]) == 0
    encoder = torch.export.load(out / "encoder.pt2").module()
    decoder = torch.export.load(out / "decoder.pt2").module()
    return ckpt, out, speedasr.load(ckpt).model, encoder, decoder, stdout.getvalue()


def errors(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """Max absolute error, and the same relative to the reference's largest magnitude."""
    err = float((got - ref).abs().max())
    return err, err / float(ref.abs().max())


def features(lengths, n_mels, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, n_mels, generator=g) for n in lengths]


# lengths unlike the export's example batch (203, 131, 77): longest first or not, 9 frames
# (the least a batch may have), 1 frame (padded inside a batch)
@pytest.mark.parametrize("lengths", [(157, 64, 9, 1, 23), (9,), (40, 300)])
def test_encoder_matches_the_packed_model(exported, lengths):
    _, _, model, encoder, _, _ = exported
    feats = features(lengths, model.cfg.n_mels)
    with torch.no_grad():
        padded = pad_sequence(feats, batch_first=True)
        enc, enc_lengths, log_probs = encoder(padded, torch.tensor(lengths))
        ref, segments = model.encode(torch.cat(feats), Segments.from_lengths(lengths))
        ref_log_probs = model.ctc_log_probs(ref)
    assert enc_lengths.tolist() == list(segments.lengths)
    abs_err, rel_err = errors(segments.unpad(enc), ref)  # real frames only
    assert abs_err < 1e-4 and rel_err < 1e-5, (abs_err, rel_err)
    abs_err, rel_err = errors(segments.unpad(log_probs), ref_log_probs)
    assert abs_err < 1e-4 and rel_err < 1e-5, (abs_err, rel_err)


def test_stacking_encoder_matches_the_packed_model():
    """A model with ``subsampling="stacking"`` (4x, xscaling) exports too: the exported encoder
    program against the packed model, on lengths unlike the example batch's, 1 to 9 frames
    (one not a multiple of the factor) included."""
    from speedasr.export import export_programs
    from speedasr.models.aed import AEDModel, ModelConfig

    torch.manual_seed(3)
    model = AEDModel(ModelConfig(
        vocab_size=40, pad_id=0, n_mels=16, d_model=32, encoder_layers=1, encoder_heads=2,
        decoder_layers=1, dropout=0.0, attention_backend="torch", ctc_weight=0.3,
        subsampling="stacking", subsampling_factor=4, xscaling=True,
    )).eval()  # fmt: skip
    encoder = export_programs(model)[0].module()
    for lengths in [(157, 64, 9, 1, 23), (9,), (42, 301)]:
        feats = features(lengths, model.cfg.n_mels, seed=len(lengths))
        with torch.no_grad():
            padded = pad_sequence(feats, batch_first=True)
            enc, enc_lengths, log_probs = encoder(padded, torch.tensor(lengths))
            ref, segments = model.encode(torch.cat(feats), Segments.from_lengths(lengths))
            ref_log_probs = model.ctc_log_probs(ref)
        assert enc_lengths.tolist() == list(segments.lengths) == [-(-n // 4) for n in lengths]
        abs_err, rel_err = errors(segments.unpad(enc), ref)
        assert abs_err < 1e-4 and rel_err < 1e-5, (lengths, abs_err, rel_err)
        abs_err, rel_err = errors(segments.unpad(log_probs), ref_log_probs)
        assert abs_err < 1e-4 and rel_err < 1e-5, (lengths, abs_err, rel_err)


def test_decoder_matches_the_packed_model(exported):
    _, _, model, encoder, decoder, _ = exported
    lengths, token_lengths = (157, 64, 9, 23), (6, 4, 9, 5)
    feats = features(lengths, model.cfg.n_mels, seed=1)
    g = torch.Generator().manual_seed(2)
    tokens = [torch.randint(0, model.cfg.vocab_size, (n,), generator=g) for n in token_lengths]
    with torch.no_grad():
        enc, enc_segments = model.encode(torch.cat(feats), Segments.from_lengths(lengths))
        token_segments = Segments.from_lengths(token_lengths)
        ref = model.decode_logits(torch.cat(tokens), token_segments, enc, enc_segments)
        logits = decoder(
            pad_sequence(tokens, batch_first=True, padding_value=model.cfg.pad_id),
            torch.tensor(token_lengths), enc_segments.pad(enc), torch.tensor(lengths).add(7) // 8,
        )  # fmt: skip
    abs_err, rel_err = errors(token_segments.unpad(logits), ref)
    assert abs_err < 1e-4 and rel_err < 1e-5, (abs_err, rel_err)


def test_export_files(exported):
    _, out, model, _, _, stdout = exported
    meta = json.loads((out / "export.json").read_text())
    assert meta["n_mels"] == model.cfg.n_mels and meta["blank_id"] == model.cfg.pad_id
    assert meta["encoder_outputs"] == ["encoder_out", "encoder_lengths", "ctc_log_probs"]
    assert set(meta["prompts"]) == {"en"} and len(meta["prompts"]["en"]) == 4
    assert {p.name for p in out.iterdir()} == {
        "encoder.pt2", "decoder.pt2", "tokenizer.model", "export.json"
    }  # fmt: skip
    assert f"to {out}/" in stdout


def test_export_bad_out_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    ckpt = tmp_path / "missing.ckpt"
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a directory" in err and len(err.splitlines()) == 1


def docs_script() -> str:
    section = (ROOT / "docs/api.md").read_text().split("### Decoding without speedasr", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_docs_script_decodes_as_speedasr_without_it(exported, tmp_path):
    ckpt, out, _, _, _, _ = exported
    cuts = make_tiny_cuts(tmp_path / "data", 3, seed=4, durations=(0.6, 2.0))
    paths = [c.recording.sources[0].source for c in cuts]
    audio, rate = sf.read(paths[0], dtype="float32")
    sf.write(tmp_path / "a8k.wav", audio[::2], rate // 2, subtype="FLOAT")  # resampled by both
    paths.append(str(tmp_path / "a8k.wav"))
    script = tmp_path / "decode.py"
    script.write_text(docs_script())
    # speedasr cannot be imported in that process: the script runs on torch, lhotse, sentencepiece
    run = (
        "import runpy, sys; sys.modules['speedasr'] = None; "
        f"sys.argv = {[str(script), str(out), *paths]!r}; "
        f"runpy.run_path({str(script)!r}, run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("\t") for line in proc.stdout.splitlines()]
    model = speedasr.load(ckpt)
    assert [r[0] for r in rows] == paths
    assert [r[1] for r in rows] == model.transcribe(paths)
    assert [r[2] for r in rows] == model.transcribe(paths, decoder="ctc")
    assert len({r[2] for r in rows}) > 1  # the CTC texts tell the utterances apart
