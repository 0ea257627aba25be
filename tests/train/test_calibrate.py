"""`speedasr calibrate`: search logic, and a real CPU calibration that training then respects."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from speedasr.checkpoint import tokenizer_from_state
from speedasr.cli import main
from speedasr.core.batch import IGNORE_INDEX
from speedasr.data.bucketing import BucketBins
from speedasr.data.tokenizer import Tokenizer
from speedasr.models.aed import ModelConfig
from speedasr.nemo.import_nemo import import_nemo
from speedasr.testing import make_tiny_cuts, tiny_texts
from speedasr.train.calibrate import calibrate_buckets, largest_batch, synthetic_batch


@pytest.mark.parametrize("limit", [1, 7, 37, 100, 1000])
def test_largest_batch_is_within_the_gap(limit):
    tried = []

    def fits(b):
        tried.append(b)
        return b <= limit, b

    b, peak = largest_batch(fits, 0, max_batch=512, gap=0.05)
    assert b <= min(limit, 512) and b >= min(limit, 512) / 1.05 - 1
    assert peak == b
    assert len(tried) <= 2 * 10 + 2  # doubling + bisection, not a linear scan


def test_buckets_are_searched_largest_first_and_monotone():
    class FakeCalibrator:
        """Memory = 1 + B·d·L/100; the limit is 200."""

        trials = 0
        order: list = []

        def fits(self, d, n, b):
            self.trials += 1
            self.order.append((d, n))
            peak = 1 + b * d * n / 100
            return peak <= 200, peak

    shapes = BucketBins([2.0, 4.0, 8.0], [[10, 20], [20, 40], [50, 80]], [20, 20, 20]).shapes()
    calibrator = FakeCalibrator()
    results = calibrate_buckets(calibrator, shapes, max_batch=4096, gap=0.05)
    assert calibrator.order[0] == shapes[-1]  # the largest bucket first
    sizes = [r.batch_size for r in results]
    for r, s in zip(results, sizes, strict=True):
        assert 1 + s * r.duration * r.tokens / 100 <= 200  # fits
        assert 1 + s * 1.06 * r.duration * r.tokens / 100 > 200 or s == 4096  # within ~5%
    for a in results:  # monotone along dominance
        for b in results:
            if a.duration <= b.duration and a.tokens <= b.tokens:
                assert a.batch_size >= b.batch_size


def _peak_rss_gib(*args: str, cwd) -> tuple[subprocess.CompletedProcess, float]:
    """Run `speedasr ARGS` in a fresh process; its peak RSS (VmHWM) in GiB."""
    code = (
        "import sys; from speedasr.cli import main; rc = main(sys.argv[1:]); "
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
        "print('PEAK_KB', hwm); sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=900, cwd=cwd
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("PEAK_KB")]
    return proc, (int(lines[0].split()[1]) / 2**20 if lines else float("nan"))


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="CPU calibration reads /proc")
def test_cpu_calibration_is_monotone_and_training_stays_within_budget(tmp_path):
    make_tiny_cuts(tmp_path / "train", n=24, seed=0, speech=True)
    Tokenizer.train(tiny_texts(200, seed=1), tmp_path / "tok", vocab_size=96)
    BucketBins([1.5, 2.5, 3.5], [[18, 24], [28, 36], [44]], [40, 40, 40]).save(
        tmp_path / "bins.json"
    )
    (tmp_path / "c.yaml").write_text(
        "model: {d_model: 32, encoder_layers: 1, encoder_heads: 2, decoder_layers: 1,"
        " subsampling_channels: 8, attention_backend: torch}\n"
        "sampler: {mode: bucket2d, bins: bins.json, strict: false}\n"
        "data: {train_cuts: train/cuts.jsonl.gz, tokenizer: tok, num_workers: 0}\n"
        "trainer: {max_epochs: null, max_steps: 4, accelerator: cpu, devices: 1,"
        " enable_progress_bar: false}\n"
        "monitors: {padding: false, gpu: false, throughput: false}\n"
    )
    # The budget: what this interpreter needs with speedasr's training imports, plus 100 MiB.
    probe = subprocess.run(
        [sys.executable, "-c", "import speedasr.train.run, speedasr.config, pytorch_lightning; "
         "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    budget = int(probe.stdout.split()[-1]) / 2**20 + 0.1
    proc, calib_peak = _peak_rss_gib(
        "calibrate", "--config", "c.yaml", "--out", "cal.yaml", "--json", "cal.json",
        "--memory-budget", f"{budget:.4f}", "--max-batch", "48", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The calibrating process itself stays near the budget. Its peak is a high-water mark, so the
    # last trial found too big leaves it above the budget by that trial's excess; bisection stops
    # at a 5% gap. Measured overshoots: 2.5-2.8% with the current encoder, under 2% before it.
    assert calib_peak <= budget * 1.05
    sampler = yaml.safe_load((tmp_path / "cal.yaml").read_text())["sampler"]
    sizes = sampler["batch_sizes"]
    assert len(sizes) == 5 and min(sizes) >= 1
    shapes = BucketBins.load(tmp_path / "bins.json").shapes()
    for i, (da, la) in enumerate(shapes):  # monotone non-increasing along bucket size
        for j, (db, lb) in enumerate(shapes):
            if da <= db and la <= lb:
                assert sizes[i] >= sizes[j], (sizes, shapes)
    assert sizes[0] >= sizes[-1] and sizes[-1] < 48  # the budget was binding

    proc, train_peak = _peak_rss_gib(
        "train", "--config", "c.yaml", "--config", "cal.yaml", "--out_dir", "exp", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train_peak <= budget, (train_peak, budget, sizes)
    print(f"budget {budget:.3f} GiB, calibration peak {calib_peak:.3f}, training peak "
          f"{train_peak:.3f}, batch sizes {sizes}")  # fmt: skip


def test_overrides_use_train_syntax_and_reach_the_config(tmp_path, capsys):
    """``--SECTION.KEY=VALUE`` overrides the YAML as ``speedasr train`` does: the YAML's
    bucket2d mode, overridden to random, is refused by name before any work."""
    (tmp_path / "c.yaml").write_text("sampler: {mode: bucket2d}\ndata: {tokenizer: tok}\n")
    base = ["calibrate", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o.yaml")]
    assert main([*base, "--sampler.mode=random"]) == 2
    assert "needs sampler.mode bucket2d or packed, not random" in capsys.readouterr().err
    assert main([*base, "--set", "sampler.mode=random"]) == 2  # deprecated spelling, one release
    err = capsys.readouterr().err
    assert "--set is deprecated" in err and "not random" in err
    assert main([*base, "--sampler.mode=randm"]) == 2
    assert "--sampler.mode=randm: expected one of packed, bucket2d" in capsys.readouterr().err
    assert main([*base, "--modle.d_model=256"]) == 2
    assert "did you mean --model.d_model?" in capsys.readouterr().err
    assert main([*base, "--data.spec_augment.enabled=flase"]) == 2  # nested section, bool typo
    assert "expected true or false" in capsys.readouterr().err
    assert not (tmp_path / "o.yaml").exists()


NEMO = Path(__file__).parents[1] / "fixtures" / "nemo" / "canary_tiny.nemo"


@pytest.fixture(scope="module")
def imported_with_size(tmp_path_factory):
    """import-nemo's output directory and the parameters of the model import-nemo built."""
    out = tmp_path_factory.mktemp("imported")
    model = import_nemo(NEMO, out).model
    return out, sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def imported(imported_with_size):
    return imported_with_size[0]


def _init_from_config(tmp_path, imported, extra: str = "", flag: bool = False) -> list[str]:
    """calibrate's arguments for a config fine-tuning ``imported`` (``init_from`` in the YAML, or
    with ``flag`` as ``--init_from``)."""
    BucketBins([1.0, 2.0], [[20], [30]], [40, 40]).save(tmp_path / "bins.json")
    (tmp_path / "c.yaml").write_text(
        ("" if flag else f"init_from: {imported}\n") + "model: {dropout: 0.0}\n"
        f"sampler: {{mode: bucket2d, bins: {tmp_path / 'bins.json'}}}\n{extra}"
    )
    args = ["calibrate", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o.yaml")]
    return [*args, "--init_from", str(imported)] if flag else args


def test_init_from_calibrates_the_checkpoints_model(tmp_path, imported_with_size):
    """With ``init_from`` (and no data.tokenizer) calibration runs the model training will run:
    the checkpoint's settings with the config's ``model.*`` on top, NeMo's padded vocabulary."""
    imported, parameters = imported_with_size
    args = _init_from_config(tmp_path, imported, flag=True)
    code = main([*args, "--json", str(tmp_path / "o.json"), "--memory-budget", "1000",
                 "--max-batch", "2", "--device", "cpu"])  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "o.json").read_text())
    saved = torch.load(imported / "model.ckpt", weights_only=True)["hyper_parameters"]["model"]
    assert report["model"] == json.loads(json.dumps({**saved, "dropout": 0.0}))
    assert report["model"]["vocab_size"] == 128  # 126 tokenizer pieces, padded to 8 by NeMo
    assert report["parameters"] == parameters
    # the synthetic batches' prompt is the checkpoint tokenizer's (canary2: 9 tokens)
    tokenizer = tokenizer_from_state(
        torch.load(imported / "model.ckpt", weights_only=True)["tokenizer"]
    )
    assert report["prompt_tokens"] == len(tokenizer.prompt("en")) == 9
    assert yaml.safe_load((tmp_path / "o.yaml").read_text())["sampler"]["batch_sizes"] == [2, 2]


def test_init_from_errors_match_training(tmp_path, imported, capsys):
    args = _init_from_config(tmp_path, imported, extra=f"data: {{tokenizer: {tmp_path}}}\n")
    assert main(args) == 2
    assert "data.tokenizer and init_from are both set" in capsys.readouterr().err
    args = _init_from_config(tmp_path, imported)
    assert main([*args, "--model.ff_mult=2"]) == 2
    err = capsys.readouterr().err
    assert "does not fit this model: shapes differ" in err and "ff_mult 4 -> 2" in err
    assert not (tmp_path / "o.yaml").exists()


def test_synthetic_batches_mask_the_tokenizers_prompt():
    """Calibration's worst-case batch: every utterance ``tokens`` long, the first
    ``prompt_tokens`` of them a prompt that has no loss (canary2's 9 here, not speedasr's 4)."""
    cfg = ModelConfig(vocab_size=50)
    batch = synthetic_batch(0.5, 12, 3, cfg, "packed", prompt_tokens=9)
    assert batch.prompt_lengths == (9, 9, 9)
    assert batch.token_segments.lengths == (12, 12, 12)
    for targets in batch.token_segments.split(batch.targets):
        assert (targets[:8] == IGNORE_INDEX).all() and (targets[8:] != IGNORE_INDEX).all()
    # a bucket edge shorter than prompt + 1 still gets one text token
    assert synthetic_batch(0.5, 5, 1, cfg, "packed", prompt_tokens=9).token_segments.lengths == (
        10,
    )
