"""`speedasr profile`: summary and plots from a toy Lightning run that used the three callbacks."""

import re
import shutil

import matplotlib.image
import pytest
import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger

from speedasr.cli import main
from speedasr.profile.logs import load_run
from speedasr.profile.report import summarize
from speedasr.profile.testing import FakeGPU, ToyModule, loader, random_batches, toy_flops
from speedasr.train.callbacks import GPUUtilizationMonitor, PaddingMonitor, SpeechThroughputMonitor

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pytorch_lightning")


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A 120-step toy run logging every 10 steps: (log dir, padding monitor)."""
    root = tmp_path_factory.mktemp("logs")
    padding = PaddingMonitor(frame_shift=0.01)
    trainer = pl.Trainer(
        max_steps=120,
        logger=CSVLogger(root, name="toy"),
        callbacks=[
            padding,
            GPUUtilizationMonitor(0.002, source=FakeGPU()),
            SpeechThroughputMonitor(flops_per_batch=toy_flops, peak_flops=1.5e12, frame_shift=0.01),
        ],
        log_every_n_steps=10,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(ToyModule(step_seconds=0.002), loader(random_batches(120)))
    return root, padding


def test_profile_writes_summary_and_plots(toy_run, capsys):
    root, padding = toy_run
    assert main(["profile", "--log-dir", str(root)]) == 0  # finds toy/version_0/metrics.csv
    out = root / "toy" / "version_0" / "profile"
    printed = capsys.readouterr().out
    assert printed.strip() == (out / "summary.txt").read_text().strip()
    for axis, fraction in padding.fractions().items():
        assert f"{axis.replace('_', ' '):<15} whole run {100 * fraction:5.1f}%" in printed
    assert "120 sampled batches" in printed
    assert "MFU" in printed and "GPU (rank 0): utilization" in printed
    for name in ("padding", "batch_shapes", "throughput", "gpu"):
        image = matplotlib.image.imread(out / f"{name}.png")
        height, width = image.shape[:2]
        assert width > 600 and height > 300
        assert image[..., :3].std() > 0.05  # not a blank canvas


def test_profile_from_metrics_file_without_gpu_or_shapes(toy_run, tmp_path):
    root, _ = toy_run
    metrics = tmp_path / "metrics.csv"
    shutil.copy(root / "toy" / "version_0" / "metrics.csv", metrics)
    run = load_run(metrics)
    assert run.shapes == [] and run.shapes_path is None
    run.series = {k: v for k, v in run.series.items() if not k.startswith("gpu/")}
    assert "GPU: not monitored" in summarize(run)
    assert main(["profile", "--metrics", str(metrics), "--out", str(tmp_path / "p")]) == 0
    assert sorted(p.name for p in (tmp_path / "p").glob("*.png")) == [
        "gpu.png",
        "padding.png",
        "throughput.png",
    ]


def test_profile_errors_name_the_input(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["profile", "--log-dir", str(missing)]) == 2
    assert f"log directory '{missing}' does not exist" in capsys.readouterr().err

    assert main(["profile", "--log-dir", str(tmp_path)]) == 2
    assert "no metrics.csv under" in capsys.readouterr().err

    other = tmp_path / "metrics.csv"
    other.write_text("epoch,step,train_loss\n0,1,0.5\n")
    assert main(["profile", "--metrics", str(other)]) == 2
    assert "has no padding/, throughput/ or gpu/ metrics" in capsys.readouterr().err

    assert main(["profile", "--metrics", str(tmp_path / "missing.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_profile_of_a_run_without_outputs(tmp_path, capsys):
    """Encoder-only batches (x, x_lens): token axes absent, shape map over batch size."""
    batches = [b[:2] for b in random_batches(20, seed=1)]
    trainer = pl.Trainer(
        max_steps=20,
        logger=CSVLogger(tmp_path, name="enc"),
        callbacks=[PaddingMonitor()],
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(ToyModule(), loader(batches))
    assert main(["profile", "--log-dir", str(tmp_path), "--out", str(tmp_path / "p")]) == 0
    printed = capsys.readouterr().out
    assert "tokens          absent" in printed and "longest utterance per batch" in printed
    assert sorted(p.name for p in (tmp_path / "p").glob("*.png")) == [
        "batch_shapes.png",
        "padding.png",
    ]


# Five logging intervals of 10 steps: (training seconds, utterances). The first is slow (start-up).
INTERVALS = [(20.0, 40), (2.0, 100), (2.5, 100), (2.0, 90), (4.0, 120)]
WHOLE_RUN = 450 / 30.5  # run totals / training time = 14.75 utterances/s
MEDIAN = 40.0  # of the interval rates 2, 50, 40, 45, 30


def test_whole_run_and_median_throughput_are_labelled_for_what_they_are(tmp_path, capsys):
    """summary() and `speedasr profile` print different utterances/s; each label says which."""
    metrics = tmp_path / "metrics.csv"
    rows, elapsed = ["epoch,step,throughput/utterances_per_sec,throughput/train_seconds"], 0.0
    for i, (seconds, utterances) in enumerate(INTERVALS, 1):
        elapsed += seconds
        rows.append(f"0,{10 * i},{utterances / seconds},{elapsed}")
    metrics.write_text("\n".join(rows) + "\n")
    assert main(["profile", "--metrics", str(metrics), "--out", str(tmp_path / "p")]) == 0
    printed = capsys.readouterr().out
    found = re.search(
        r"Throughput per device, median of 5 logging intervals of 10 steps \(30.5 s of training\):"
        r"\n  ([\d.]+) utterances/s",
        printed,
    )
    assert found and float(found[1]) == MEDIAN

    speed = SpeechThroughputMonitor()
    totals = {"batches": 50, "utterances": 450, "train_seconds": elapsed}
    speed.load_state_dict({"totals": totals, "has": [], "batches": 50})
    found = re.search(
        r"Throughput per device, whole run \(run totals / 30.5 s of training, 50 batches\): "
        r"([\d.]+) utterances/s",
        speed.summary(),
    )
    assert found and float(found[1]) == pytest.approx(WHOLE_RUN, abs=0.05)


def test_profile_lists_the_axes_the_run_logged(tmp_path, capsys):
    metrics = tmp_path / "metrics.csv"
    metrics.write_text(
        "epoch,step,padding/total/frames,padding/window/frames,"
        "padding/total/encoder_self_attention,padding/window/encoder_self_attention\n"
        "0,10,0.25,0.3,0.5,0.55\n"
    )
    assert main(["profile", "--metrics", str(metrics), "--out", str(tmp_path / "p")]) == 0
    printed = capsys.readouterr().out
    assert "  frames                  whole run  25.0%   last window  30.0%" in printed
    assert "  encoder self attention  whole run  50.0%   last window  55.0%" in printed
    assert "tokens" not in printed and "  attention" not in printed
