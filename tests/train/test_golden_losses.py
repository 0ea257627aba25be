"""Golden losses: the tiny recipe's model trains for a few dozen steps through ``speedasr train``'s
own code (``parse_config`` -> ``train``: sampler, features, model, losses, AdamW, schedule, gradient
clipping) and its per-step losses must match ``golden_losses.json`` within a tolerance, so that a
change that silently alters learning (a learning rate, a mask, a loss term, an initialization)
fails CI instead of showing up days later as a worse WER.

An intended change regenerates the file (and the diff of the file goes in the commit):

    SPEEDASR_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q tests/train/test_golden_losses.py

The run is pinned here, not read from recipes/tiny/demo.yaml: the demo model's width, depth and
options, written out (the demo's own settings may change, e.g. its position options). The data is
a small corpus made on the fly: 24 eSpeak NG utterances (the ``[demo]`` extra) and a BPE-96
tokenizer on their texts. One torch thread (set here, not only by tests/conftest.py): the result
depends on the thread count by float rounding only, measured below.

Tolerance, measured on the 2-core development machine (torch 2.13 CPU, 2026-12-07): two runs with
one thread give bit-identical losses; one vs two threads differ by at most 2.4e-6 absolute,
5.3e-7 relative, over the 30 steps and three losses (float summation order; it did not grow over
the steps). Another CPU's kernels (SIMD width, oneDNN/MKL version) change summation order the same
way, so ``RTOL`` = 1e-4 (~200x the thread drift) with ``ATOL`` = 1e-5 leaves room for them, while
anything that changes learning moves the losses by orders of magnitude more. Measured on this run:
a learning rate of 0 moves the total loss by 0.05 at step 1 and up to 0.90 (20%); the CTC loss
switched off (``ctc_weight=0``) by 1.5 at step 0 (and no CTC loss is logged at all).
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch

from speedasr.data.tokenizer import Tokenizer
from speedasr.testing import make_tiny_cuts
from speedasr.train.run import parse_config, train

GOLDEN = Path(__file__).with_name("golden_losses.json")
UPDATE_ENV = "SPEEDASR_UPDATE_GOLDEN"
STEPS = 30
KEYS = ("train/loss", "train/ce_loss", "train/ctc_loss")
RTOL, ATOL = 1e-4, 1e-5
"""Per step and loss: ``|loss - golden| <= max(RTOL * max(|loss|, |golden|), ATOL)`` (see above)."""

# The demo model (recipes/tiny/demo.yaml as of 2026-12-07), every setting that shapes learning
# written out, on batches of <= 6 s of audio instead of 60 s (seconds per step, not minutes).
CONFIG = [
    "--seed=0",
    "--data.layout=packed", "--data.num_workers=0", "--data.spec_augment.enabled=false",
    "--sampler.mode=packed", "--sampler.max_duration=6.0", "--sampler.num_buckets=2",
    "--sampler.num_token_buckets=1",
    "--model.n_mels=80", "--model.d_model=144", "--model.encoder_layers=4",
    "--model.encoder_heads=4", "--model.decoder_layers=1", "--model.subsampling_channels=32",
    "--model.conv_kernel=9", "--model.block_out_norm=false", "--model.ff_mult=4",
    "--model.tie_embeddings=true", "--model.absolute_token_positions=false",
    "--model.absolute_memory_positions=false", "--model.dropout=0.1", "--model.ctc_weight=0.5",
    "--model.label_smoothing=0.1", "--model.attention_backend=torch",
    "--optim.lr=0.003", "--optim.warmup_steps=10", "--optim.schedule=cosine",
    "--optim.weight_decay=0.001", "--optim.min_lr_ratio=0.05",
    "--trainer.max_epochs=null", f"--trainer.max_steps={STEPS}", "--trainer.accelerator=cpu",
    "--trainer.precision=32-true", "--trainer.gradient_clip_val=1.0",
    "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
    "--monitors.gpu=false", "--monitors.padding=false", "--monitors.throughput=false",
]  # fmt: skip


def train_losses(root: Path, threads: int = 1, extra: tuple[str, ...] = ()) -> dict[str, list]:
    """Per-step losses (``KEYS``) of the pinned run on the corpus under ``root``."""
    saved = torch.get_num_threads(), torch.get_float32_matmul_precision()
    torch.set_num_threads(threads)
    out = root / f"exp-{threads}-{len(list(root.glob('exp-*')))}"
    try:
        cfg = parse_config(
            [*CONFIG, f"--out_dir={out}", f"--data.train_cuts={root / 'train/cuts.jsonl.gz'}",
             f"--data.tokenizer={root / 'tok'}", *extra]
        )  # fmt: skip
        assert train(cfg) == 0
    finally:  # train() sets both for the process; later tests get theirs back
        torch.set_num_threads(saved[0])
        torch.set_float32_matmul_precision(saved[1])
    rows = list(csv.DictReader(next(out.glob("logs/version_*/metrics.csv")).open()))
    losses: dict[str, list] = {k: [] for k in KEYS}
    for row in rows:
        if row.get("train/loss"):
            for k in KEYS:  # a loss the run did not log (no CTC head) compares as NaN: unequal
                losses[k].append(float(row.get(k) or "nan"))
    return losses


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("golden")
    cuts = make_tiny_cuts(root / "train", n=24, seed=0, speech=True)
    Tokenizer.train([c.supervisions[0].text for c in cuts], root / "tok", vocab_size=96)
    return root


def test_losses_match_golden(corpus):
    losses = train_losses(corpus)
    assert all(len(v) == STEPS for v in losses.values()), {k: len(v) for k, v in losses.items()}
    if os.environ.get(UPDATE_ENV):
        GOLDEN.write_text(
            json.dumps(
                {
                    "about": "per-step losses of tests/train/test_golden_losses.py; "
                    f"regenerate with {UPDATE_ENV}=1",
                    "torch": torch.__version__,
                    "losses": losses,
                },
                indent=1,
            )
            + "\n"
        )
        pytest.skip(f"{UPDATE_ENV} is set: wrote {GOLDEN}, compared nothing")
    saved = json.loads(GOLDEN.read_text())
    golden = saved["losses"]
    bad = [
        f"{k} step {i}: {got:.5f}, golden {want:.5f}"
        for k in KEYS
        for i, (got, want) in enumerate(zip(losses[k], golden[k], strict=True))
        if not math.isclose(got, want, rel_tol=RTOL, abs_tol=ATOL)
    ]
    assert not bad, (
        f"{len(bad)} losses differ from {GOLDEN.name} beyond rtol {RTOL} / atol {ATOL} "
        f"(first: {bad[:3]}; golden from torch {saved['torch']}, this is {torch.__version__}); "
        f"if the change is intended, rerun with {UPDATE_ENV}=1"
    )
