"""NeMo itself restores what export-nemo writes (marked ``nemo``: needs a Python with
nemo-toolkit, given as ``SPEEDASR_NEMO_PYTHON``, e.g. the venv of tools/nemo_fixture/README.md):

    SPEEDASR_NEMO_PYTHON=/work/nemo-venv/bin/python .venv/bin/python -m pytest -m nemo tests/nemo

``tools/nemo_fixture/check_export.py`` runs NeMo's ``restore_from`` on the exported file and
NeMo's forward and greedy decoding on the fixture's audio, and requires the fixture's outputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from speedasr.nemo.export_nemo import export_nemo
from speedasr.nemo.import_nemo import import_nemo

REPO = Path(__file__).parents[2]
NEMO_PYTHON = os.environ.get("SPEEDASR_NEMO_PYTHON")


@pytest.mark.nemo
@pytest.mark.skipif(not NEMO_PYTHON, reason="SPEEDASR_NEMO_PYTHON (a Python with NeMo) not set")
def test_nemo_restores_the_export_and_gives_the_fixture_outputs(tmp_path):
    ckpt, *_ = import_nemo(REPO / "tests/fixtures/nemo/canary_tiny.nemo", tmp_path / "imported")
    exported = export_nemo(ckpt, tmp_path / "exported.nemo").path
    result = subprocess.run(
        [NEMO_PYTHON, str(REPO / "tools/nemo_fixture/check_export.py"), str(exported)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    sys.stdout.write(result.stdout[-2000:])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "ids and texts equal" in result.stdout


@pytest.mark.nemo
@pytest.mark.skipif(not NEMO_PYTHON, reason="SPEEDASR_NEMO_PYTHON (a Python with NeMo) not set")
def test_nemo_computes_what_the_finetuned_model_computes(tmp_path):
    """Fine-tune the fixture (2 packed steps, dropout changed), export it: NeMo restores the file,
    its config states the new dropout, and NeMo's features, encoder output and teacher-forced
    log-probs on the fixture audio equal the fine-tuned speedasr model's."""
    import torch

    from speedasr.checkpoint import load_model
    from speedasr.cli import main
    from speedasr.core.segments import Segments
    from speedasr.testing import make_tiny_cuts

    import_nemo(REPO / "tests/fixtures/nemo/canary_tiny.nemo", tmp_path / "imported")
    make_tiny_cuts(tmp_path / "data", n=3, seed=0, speech=True)
    assert main([
        "train", "--init_from", str(tmp_path / "imported"), "--model.dropout=0.0",
        "--out_dir", str(tmp_path / "exp"), "--data.train_cuts",
        str(tmp_path / "data/cuts.jsonl.gz"), "--data.num_workers=0", "--optim.lr=0.01",
        "--optim.warmup_steps=0", "--trainer.max_steps=2", "--trainer.max_epochs=null",
        "--trainer.enable_progress_bar=false", "--monitors.gpu=false",
    ]) == 0  # fmt: skip
    last = tmp_path / "exp/checkpoints/last.ckpt"
    exported = export_nemo(last, tmp_path / "finetuned.nemo").path
    result = subprocess.run(
        [NEMO_PYTHON, str(REPO / "tools/nemo_fixture/dump_outputs.py"), str(exported),
         str(tmp_path / "nemo_outputs.pt")],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    ref = torch.load(tmp_path / "nemo_outputs.pt", weights_only=True)
    assert ref["config.encoder.dropout"] == 0.0
    model = load_model(last).model

    def rel(ours, theirs) -> float:
        assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
        return float((ours - theirs).abs().max() / theirs.abs().max())

    with torch.no_grad():
        for u in range(3):
            feats = model.frontend(ref[f"utt{u}.audio"])
            assert rel(feats.T, ref[f"utt{u}.features"]) <= 1e-5
            fs = Segments.from_lengths([feats.shape[0]], "cpu")
            enc, es = model.encode(ref[f"utt{u}.features"].T.contiguous(), fs)
            assert rel(enc, ref[f"utt{u}.encoder_output"]) <= 1e-5
            ids = ref[f"utt{u}.target_ids"][:-1]
            ts = Segments.from_lengths([len(ids)], "cpu")
            log_probs = model.decode_logits(ids, ts, enc, es).log_softmax(-1)
            assert rel(log_probs, ref[f"utt{u}.decoder_log_probs"]) <= 1e-5
