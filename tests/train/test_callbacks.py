"""Profiler callbacks in a minimal plain-Lightning project (toy module, padded (x, lens) batches).

Expected padding values are computed by hand in the comments, not with speedasr's accounting.
"""

import csv
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger

from speedasr.core.batch import PackedBatch, PaddedBatch
from speedasr.core.geometry import GIB
from speedasr.core.segments import Segments
from speedasr.data.padding import batch_padding
from speedasr.profile.batch_lengths import BatchLengths, default_batch_lengths
from speedasr.profile.gpu import GPUSample, GPUSampler, UtilizationWindow
from speedasr.profile.testing import FakeGPU, ToyModule, loader, padded_batch
from speedasr.train import callbacks
from speedasr.train.callbacks import GPUUtilizationMonitor, PaddingMonitor, SpeechThroughputMonitor

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pytorch_lightning")


def identity(t: int) -> int:
    return t


# Three batches (encoder_length = identity, so encoder frames = frames):
# B1: frames [2, 4] in T_pad 4, tokens [1, 3] in L_pad 3
#     frames 6/8 real -> 0.25; tokens 4/6 -> 1/3
#     attention: enc 4+16=20 of 2*16=32, dec 1+9=10 of 2*9=18, cross 1*2+3*4=14 of 2*3*4=24
#     -> 44 of 74
# B2: frames [3, 3], tokens [2, 2]: no padding; attention 18+8+12 = 38 of 38
# B3: frames [1, 5, 2] in T_pad 6 (> longest: padded shape comes from the tensor),
#     tokens [4, 1, 1] in L_pad 4
#     frames 8/18; tokens 6/12; attention enc 1+25+4=30 of 3*36=108, dec 16+1+1=18 of 3*16=48,
#     cross 4*1+1*5+1*2=11 of 3*4*6=72 -> 59 of 228
BATCHES = [
    padded_batch([2, 4], [1, 3]),
    padded_batch([3, 3], [2, 2]),
    padded_batch([1, 5, 2], [4, 1, 1], padded_frames=6),
]
STEP = {  # per batch: (frames, tokens, attention)
    1: (2 / 8, 2 / 6, 30 / 74),
    2: (0.0, 0.0, 0.0),
    3: (10 / 18, 6 / 12, 169 / 228),
}
TOTAL = (12 / 32, 8 / 22, (340 - 141) / 340)  # sums over B1..B3: 20/32, 14/22, 141/340 real
WINDOW_2_AT_3 = (10 / 24, 6 / 16, 169 / 266)  # B2 + B3


def fit(tmp_path, callbacks, batches=BATCHES, max_steps=None, module=None, every=1, ckpt_path=None):
    trainer = pl.Trainer(
        max_steps=max_steps or len(batches),
        logger=CSVLogger(tmp_path, name="run"),
        callbacks=callbacks,
        log_every_n_steps=every,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module or ToyModule(), loader(batches), ckpt_path=ckpt_path)
    return trainer


def read_metrics(trainer) -> dict[int, dict[str, float]]:
    """step -> {metric: value}, merging the rows each logger call wrote."""
    out: dict[int, dict[str, float]] = {}
    path = Path(trainer.loggers[0].log_dir) / "metrics.csv"
    if not path.exists():  # nothing was logged
        return out
    with open(path) as f:
        for row in csv.DictReader(f):
            step = int(row.pop("step"))
            out.setdefault(step, {}).update({k: float(v) for k, v in row.items() if v != ""})
    return out


def test_padding_monitor_logs_hand_computed_fractions(tmp_path):
    monitor = PaddingMonitor(window=2, encoder_length=identity)
    trainer = fit(tmp_path, [monitor])
    metrics = read_metrics(trainer)
    for step, (frames, tokens, attention) in STEP.items():
        m = metrics[step]
        assert m["padding/step/frames"] == pytest.approx(frames)
        assert m["padding/step/encoder_frames"] == pytest.approx(frames)
        assert m["padding/step/tokens"] == pytest.approx(tokens)
        assert m["padding/step/attention"] == pytest.approx(attention)
    m = metrics[3]
    assert [m[f"padding/window/{a}"] for a in ("frames", "tokens", "attention")] == pytest.approx(
        WINDOW_2_AT_3
    )
    assert [m[f"padding/total/{a}"] for a in ("frames", "tokens", "attention")] == pytest.approx(
        TOTAL
    )
    assert monitor.fractions()["tokens"] == pytest.approx(TOTAL[1])
    summary = monitor.summary()
    assert "3 batches, 7 utterances (padded)" in summary
    assert f"{100 * TOTAL[0]:.1f}%" in summary and f"{100 * TOTAL[1]:.1f}%" in summary


def test_padding_monitor_writes_batch_shapes(tmp_path):
    trainer = fit(tmp_path, [PaddingMonitor(frame_shift=0.01, shape_sample_every=2)])
    lines = open(f"{trainer.loggers[0].log_dir}/batch_shapes.jsonl").read().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 3]  # every 2nd batch
    assert records[1] == {
        "step": 3,
        "batch_size": 3,
        "max_frames": 5,
        "max_seconds": 0.05,
        "max_tokens": 4,
        "frames": 8,
        "tokens": 6,
        "padding_frames": pytest.approx(10 / 18, abs=1e-5),
        "padding_tokens": 0.5,
        "packed": False,
    }


def test_batches_without_outputs_report_token_axes_absent(tmp_path):
    batches = [padded_batch([2, 4]), padded_batch([1, 5, 2], padded_frames=6)]
    monitor = PaddingMonitor(encoder_length=identity)
    speed = SpeechThroughputMonitor()
    trainer = fit(tmp_path, [monitor, speed], batches=batches)
    metrics = read_metrics(trainer)
    assert metrics[2]["padding/step/frames"] == pytest.approx(10 / 18)
    assert metrics[2]["padding/total/frames"] == pytest.approx(12 / 26)
    # attention is encoder self-attention only: 4+16 + 1+25+4 = 50 real of 2*16 + 3*36 = 140
    assert metrics[2]["padding/total/attention"] == pytest.approx(90 / 140)
    assert not any("tokens" in k for m in metrics.values() for k in m)
    assert "absent" in monitor.summary()
    assert "tokens" not in speed.summary()


def test_unrecognized_batches_warn_once_and_are_skipped(tmp_path):
    batches = [{"image": torch.zeros(2, 3)}] * 3
    monitor = PaddingMonitor()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, [monitor], batches=batches, module=_DictModule())
    assert sum("cannot read lengths" in str(w.message) for w in caught) == 1
    assert monitor.totals.batches == 0 and monitor.summary() == "Padding: no batches seen."


class _DictModule(ToyModule):
    def training_step(self, batch, batch_idx):
        return self.proj(next(iter(batch.values()))).mean()


# Per-kind attention of BATCHES (from the comment above): real of computed
ENCODER_SELF = (20 + 18 + 30, 32 + 18 + 108)
CROSS = (14 + 12 + 11, 24 + 12 + 72)


def test_padding_monitor_reports_only_the_axes_the_model_has(tmp_path):
    """An LSTM encoder-decoder has no attention: it names its axes and sees no attention line."""
    lstm = PaddingMonitor(axes=("frames", "tokens"), encoder_length=identity)
    ctc = PaddingMonitor(
        axes=("frames", "encoder_self_attention", "cross_attention"), encoder_length=identity
    )
    lstm_run = fit(tmp_path, [lstm])
    ctc_run = fit(tmp_path, [ctc])
    assert lstm.fractions() == pytest.approx({"frames": TOTAL[0], "tokens": TOTAL[1]})
    assert "attention" not in lstm.summary() and "encoder frames" not in lstm.summary()
    assert f"tokens          {100 * TOTAL[1]:5.1f}%" in lstm.summary()
    assert ctc.fractions() == pytest.approx(
        {
            "frames": TOTAL[0],
            "encoder_self_attention": 1 - ENCODER_SELF[0] / ENCODER_SELF[1],
            "cross_attention": 1 - CROSS[0] / CROSS[1],
        }
    )
    assert f"encoder self attention  {100 * (1 - 68 / 158):5.1f}%" in ctc.summary()
    for trainer, axes in ((lstm_run, lstm.axes), (ctc_run, ctc.axes)):
        logged = {k.rsplit("/", 1)[1] for m in read_metrics(trainer).values() for k in m}
        assert logged == set(axes)


def test_padding_axes_that_need_outputs_are_absent_without_them(tmp_path):
    monitor = PaddingMonitor(axes=("frames", "cross_attention"), encoder_length=identity)
    fit(tmp_path, [monitor], batches=[padded_batch([2, 4])])
    assert monitor.fractions() == {"frames": 0.25}
    assert "cross attention  absent (batches have no output sequence)" in monitor.summary()


def test_padding_axes_are_checked():
    with pytest.raises(ValueError, match="unknown axis 'attn'; choose from frames, "):
        PaddingMonitor(axes=("frames", "attn"))
    with pytest.raises(ValueError, match="no axis given"):
        PaddingMonitor(axes=())
    assert PaddingMonitor(axes="tokens").axes == ("tokens",)


# --- ESPnet and icefall batches, as their collate functions build them ---


def espnet_batch(speech_lengths, text_lengths):
    """espnet2 ``common_collate_fn``: ``(uttids, {speech (B, T), speech_lengths, text (B, L)
    padded with -1, text_lengths})``, raw 16 kHz waveforms."""
    t, n = max(speech_lengths), max(text_lengths)
    speech = torch.zeros(len(speech_lengths), t)
    text = torch.full((len(text_lengths), n), -1, dtype=torch.long)
    for i, (a, b) in enumerate(zip(speech_lengths, text_lengths, strict=True)):
        speech[i, :a] = 0.1
        text[i, :b] = 5
    ids = [f"utt{i}" for i in range(len(speech_lengths))]
    return ids, {
        "speech": speech,
        "speech_lengths": torch.tensor(speech_lengths),
        "text": text,
        "text_lengths": torch.tensor(text_lengths),
    }


def icefall_batch(num_frames, start_frame=None, sequence_idx=None, rows=None, samples=False):
    """lhotse ``K2SpeechRecognitionDataset`` (icefall): ``{"inputs": (B, T, F) features or
    (B, T) samples, "supervisions": {sequence_idx, text, start_frame/num_frames or
    start_sample/num_samples}}``; ``rows`` = B, ``T`` = the longest supervision end."""
    start_frame = start_frame or [0] * len(num_frames)
    sequence_idx = sequence_idx or list(range(len(num_frames)))
    rows = rows or len(num_frames)
    t = max(s + n for s, n in zip(start_frame, num_frames, strict=True))
    unit = "sample" if samples else "frame"
    return {
        "inputs": torch.zeros(rows, t) if samples else torch.zeros(rows, t, 4),
        "supervisions": {
            "sequence_idx": torch.tensor(sequence_idx, dtype=torch.int32),
            "text": ["some words"] * len(num_frames),
            f"start_{unit}": torch.tensor(start_frame, dtype=torch.int32),
            f"num_{unit}s": torch.tensor(num_frames, dtype=torch.int32),
        },
    }


class _LayoutModule(ToyModule):
    """Reads the input tensor of ESPnet and icefall batches."""

    def training_step(self, batch, batch_idx):
        x = batch[1]["speech"] if isinstance(batch, tuple | list) else batch["inputs"]
        return self.proj(x[..., :1]).pow(2).mean()


def test_espnet_batches_are_recognised(tmp_path):
    # speech 16000+8000+4000 = 28000 real samples of 3 x 16000; text 7+3+5 = 15 of 3 x 7 tokens
    batch = espnet_batch([16000, 8000, 4000], [7, 3, 5])
    monitor = PaddingMonitor(axes=("frames", "tokens"))
    speed = SpeechThroughputMonitor(frame_shift=1 / 16000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, [monitor, speed], batches=[batch], module=_LayoutModule())
    assert not [w for w in caught if "cannot read lengths" in str(w.message)]
    assert monitor.fractions() == pytest.approx({"frames": 20000 / 48000, "tokens": 6 / 21})
    assert (speed.totals["utterances"], speed.totals["tokens"]) == (3, 15)
    assert speed.totals["audio_seconds"] == pytest.approx(28000 / 16000)


def test_icefall_batches_are_recognised(tmp_path):
    one_per_cut = icefall_batch([50, 20, 35])  # 105 real frames of 3 x 50
    # two cuts, three supervisions: cut 0 holds frames 0-20 and 30-45 (ends at 45), cut 1 0-40
    two_in_one = icefall_batch([20, 15, 40], start_frame=[0, 30, 0], sequence_idx=[0, 0, 1], rows=2)
    monitor = PaddingMonitor(encoder_length=identity)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, [monitor], batches=[one_per_cut, two_in_one], module=_LayoutModule())
    assert not [w for w in caught if "cannot read lengths" in str(w.message)]
    assert monitor.totals.utterances == 5
    # frames: (105 + 45 + 40) real of 150 + 2 x 45 computed; supervisions hold text, not tokens
    assert monitor.fractions()["frames"] == pytest.approx(1 - 190 / 240)
    assert "tokens" not in monitor.fractions()

    audio = default_batch_lengths(icefall_batch([16000, 4000], samples=True)).on_host()
    assert audio == BatchLengths((16000, 4000), input_padded_length=16000)


# --- default batch adapter ---


def test_default_adapter_tuples_and_dicts():
    x, x_lens, y, y_lens = padded_batch([1, 5, 2], [4, 1, 1], padded_frames=6)
    lengths = default_batch_lengths((x, x_lens, y, y_lens)).on_host()
    assert lengths == BatchLengths((1, 5, 2), (4, 1, 1), False, 6, 4)
    assert default_batch_lengths((x, x_lens)).on_host().output_lengths is None
    assert default_batch_lengths((x, x)) is None and default_batch_lengths("text") is None

    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    labels = torch.tensor([[7, 7, 7], [7, -100, -100]])
    hf = default_batch_lengths(
        {"input_features": x[:2, :4], "attention_mask": mask, "labels": labels}
    )
    assert hf.on_host() == BatchLengths((2, 4), (3, 1), False, 4, 3)
    fairseq = default_batch_lengths({"source": x[:2, :4], "padding_mask": mask == 0})
    assert fairseq.on_host().input_lengths == (2, 4) and fairseq.output_lengths is None
    keyed = default_batch_lengths({"x": x, "x_lens": x_lens, "y": y, "y_lens": y_lens})
    assert keyed.on_host() == lengths
    packed = default_batch_lengths({"x": torch.zeros(8, 3), "cu_seqlens": torch.tensor([0, 3, 8])})
    assert packed.packed and packed.on_host().input_lengths == (3, 5)


def _speedasr_batch(frames, tokens):
    fs, ts = Segments.from_lengths(frames), Segments.from_lengths(tokens)
    return PackedBatch(
        features=torch.zeros(fs.total, 2),
        feature_segments=fs,
        tokens=torch.zeros(ts.total, dtype=torch.int64),
        targets=torch.zeros(ts.total, dtype=torch.int64),
        token_segments=ts,
        prompt_lengths=(1,) * len(frames),
        durations=tuple(n / 100 for n in frames),
    )


def test_default_adapter_speedasr_batches_match_padding_accounting():
    frames, tokens = [100, 333, 17], [5, 12, 3]
    packed = _speedasr_batch(frames, tokens)
    padded = packed.to_padded(pad_id=0)
    assert isinstance(padded, PaddedBatch)
    for batch, is_packed in ((packed, True), (padded, False)):
        lengths = default_batch_lengths(batch)
        assert lengths.packed is is_packed and lengths.durations == (1.0, 3.33, 0.17)
        assert lengths.padding_stats() == batch_padding(frames, tokens, packed=is_packed)


def test_padding_monitor_on_packed_batches_is_zero(tmp_path):
    monitor = PaddingMonitor()
    for i, batch in enumerate([_speedasr_batch([100, 333], [5, 12])] * 2):
        monitor._pending.add(i, default_batch_lengths(batch))
    monitor._update()
    assert all(v == 0.0 for v in monitor.fractions().values())
    assert "(packed)" in monitor.summary()


def test_padded_length_shorter_than_longest_is_an_error():
    with pytest.raises(ValueError, match="input padded length 3"):
        BatchLengths((2, 5), input_padded_length=3).padding_stats()


# --- GPU monitor ---


def test_gpu_monitor_warns_once_on_cpu_and_logs_nothing(tmp_path):
    monitor = GPUUtilizationMonitor(0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(tmp_path, [monitor])
    assert sum("no CUDA device" in str(w.message) for w in caught) == 1
    assert not any(k.startswith("gpu/") for m in read_metrics(trainer).values() for k in m)
    assert "not monitored" in monitor.summary()


def test_utilization_window_aggregates_between_flushes():
    window = UtilizationWindow()
    for util, mem in ((50.0, 1), (100.0, 3), (0.0, 2)):
        window.add(GPUSample(util, mem * GIB, 80 * GIB))
    assert window.flush() == {
        "gpu/utilization_mean": 50.0,
        "gpu/utilization_min": 0.0,
        "gpu/memory_used_gib": 2.0,
        "gpu/memory_peak_gib": 3.0,
        "gpu/samples": 3.0,
    }
    assert window.flush() == {}  # nothing since the last flush
    window.add(GPUSample(80.0, 1 * GIB, 80 * GIB))
    assert window.flush()["gpu/memory_peak_gib"] == 1.0  # the interval peak restarts
    restored = UtilizationWindow()
    restored.load_state_dict(window.state_dict())
    assert (restored.samples, restored.utilization_mean, restored.memory_peak) == (4, 57.5, 3 * GIB)


def test_gpu_sampler_thread_pauses_and_stops():
    sampler = GPUSampler(FakeGPU(), interval=0.002)
    sampler.start()
    deadline = time.monotonic() + 5
    while sampler.window.samples < 3 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sampler.flush()["gpu/samples"] >= 3
    sampler.pause()
    time.sleep(0.02)  # a sample in flight when pausing may still land
    sampler.flush()
    time.sleep(0.03)
    assert sampler.flush() == {}
    sampler.stop()
    assert sampler._thread is None


def test_gpu_monitor_with_fake_source_logs_aggregates(tmp_path):
    fake = FakeGPU()
    monitor = GPUUtilizationMonitor(0.002, source=fake)
    trainer = fit(tmp_path, [monitor], module=ToyModule(step_seconds=0.03), every=1)
    logged = [m for m in read_metrics(trainer).values() if "gpu/utilization_mean" in m]
    assert len(logged) >= 2
    for m in logged:
        assert 45 <= m["gpu/utilization_min"] <= m["gpu/utilization_mean"] <= 95
        assert m["gpu/memory_used_gib"] <= m["gpu/memory_peak_gib"] <= 50
    assert monitor.window.samples == fake.calls
    assert monitor._sampler is None  # thread stopped at the end of training
    assert "utilization" in monitor.summary()


# --- throughput ---


def test_throughput_counts_only_real_frames_and_tokens(tmp_path):
    speed = SpeechThroughputMonitor(
        flops_per_batch=lambda b: 1e6 * float(b[1].sum()), peak_flops=1e9, frame_shift=0.01
    )
    trainer = fit(tmp_path, [speed], every=3)
    t = speed.totals
    assert (t["batches"], t["utterances"], t["frames"], t["tokens"]) == (3, 7, 20, 14)  # not 32, 22
    assert t["audio_seconds"] == pytest.approx(0.20)
    assert t["flops"] == pytest.approx(20e6)
    m = read_metrics(trainer)[3]
    per_utt = m["throughput/utterances_per_sec"]
    assert m["throughput/frames_per_sec"] / per_utt == pytest.approx(20 / 7)
    assert m["throughput/tokens_per_sec"] / per_utt == pytest.approx(14 / 7)
    assert m["throughput/audio_seconds_per_sec"] / per_utt == pytest.approx(0.2 / 7)
    assert m["throughput/batches_per_sec"] / per_utt == pytest.approx(3 / 7)
    assert m["throughput/mfu"] == pytest.approx(m["throughput/flops_per_sec"] / 1e9)
    assert m["throughput/train_seconds"] == pytest.approx(t["train_seconds"])
    assert "MFU" in speed.summary()


def test_throughput_flops_per_audio_second(tmp_path):
    speed = SpeechThroughputMonitor(flops_per_audio_second=1e9, peak_flops=1e12, frame_shift=0.01)
    trainer = fit(tmp_path, [speed], every=3)
    assert speed.totals["flops"] == pytest.approx(0.2 * 1e9)
    m = read_metrics(trainer)[3]
    assert m["throughput/flops_per_sec"] / m["throughput/audio_seconds_per_sec"] == pytest.approx(
        1e9
    )
    with pytest.raises(ValueError, match="not both"):
        SpeechThroughputMonitor(flops_per_batch=len, flops_per_audio_second=1.0)


class _FlopsModule(ToyModule):
    def flops_per_batch(self, batch):
        return 1000.0 * len(batch[1])


def test_throughput_uses_module_flops_and_excludes_validation_time(tmp_path):
    speed = SpeechThroughputMonitor(peak_flops=1e6)
    module = _FlopsModule(val_seconds=0.5)
    trainer = pl.Trainer(
        max_epochs=2,
        logger=CSVLogger(tmp_path, name="run"),
        callbacks=[speed],
        log_every_n_steps=100,  # one interval, closed at the end of training, across validation
        num_sanity_val_steps=0,
        limit_val_batches=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader(BATCHES), loader(BATCHES[:1]))
    assert speed.totals["flops"] == 1000.0 * 14  # 7 utterances per epoch
    assert speed.totals["train_seconds"] < 0.5  # the 0.5 s validation step is not training time
    m = read_metrics(trainer)[6]
    assert m["throughput/mfu"] == pytest.approx(m["throughput/flops_per_sec"] / 1e6)


# --- checkpoints ---


def test_old_throughput_monitor_name_warns_once_and_is_the_new_class(monkeypatch):
    monkeypatch.setattr(callbacks, "_warned_old_name", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from speedasr.train.callbacks import ThroughputMonitor
        from speedasr.train.callbacks import ThroughputMonitor as again
    assert ThroughputMonitor is again is SpeechThroughputMonitor
    deprecations = [w for w in caught if issubclass(w.category, FutureWarning)]
    assert len(deprecations) == 1 and "renamed SpeechThroughputMonitor" in str(
        deprecations[0].message
    )
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        callbacks.Nope  # noqa: B018


def test_runs_beside_lightnings_throughput_monitor(tmp_path):
    speed = SpeechThroughputMonitor()
    lightning = pl.callbacks.ThroughputMonitor(batch_size_fn=lambda batch: len(batch[1]))
    trainer = fit(tmp_path, [speed, lightning])
    assert speed.totals["utterances"] == 7
    ckpt = tmp_path / "both.ckpt"
    trainer.save_checkpoint(ckpt)
    assert "SpeechThroughputMonitor" in torch.load(ckpt, weights_only=False)["callbacks"]


def test_checkpoint_from_before_the_rename_resumes_its_totals(tmp_path):
    first = SpeechThroughputMonitor()
    trainer = fit(tmp_path, [first])
    ckpt = tmp_path / "old.ckpt"
    trainer.save_checkpoint(ckpt)
    checkpoint = torch.load(ckpt, weights_only=False)
    states = checkpoint["callbacks"]
    states["ThroughputMonitor"] = states.pop("SpeechThroughputMonitor")  # as 0.1 wrote it
    torch.save(checkpoint, ckpt)
    second = SpeechThroughputMonitor()
    fit(tmp_path, [second], max_steps=6, ckpt_path=ckpt)
    assert second.totals["batches"] == 6 and second.totals["utterances"] > 7


def test_monitors_resume_from_checkpoint(tmp_path):
    def monitors():
        return (
            PaddingMonitor(encoder_length=identity),
            GPUUtilizationMonitor(0.002, source=FakeGPU()),
            SpeechThroughputMonitor(),
        )

    first = monitors()
    trainer = fit(tmp_path, list(first), module=ToyModule(step_seconds=0.01))
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    states = torch.load(ckpt, weights_only=False)["callbacks"]
    assert {"PaddingMonitor", "GPUUtilizationMonitor", "SpeechThroughputMonitor"} <= set(states)

    second = monitors()
    # Steps that take 10 ms give the 2 ms sampler thread time to sample even on a loaded machine.
    fit(tmp_path, list(second), max_steps=6, ckpt_path=ckpt, module=ToyModule(step_seconds=0.01))
    padding, gpu, speed = second
    # which batches Lightning replays after a mid-epoch resume is its business; the counts carry on
    assert padding.totals.batches == speed.totals["batches"] == 6
    assert padding.totals.frames_real == speed.totals["frames"] > first[2].totals["frames"] == 20
    assert speed.totals["train_seconds"] > first[2].totals["train_seconds"]
    assert gpu.window.samples > first[1].window.samples


def test_callbacks_import_without_model_code():
    code = (
        "import sys, speedasr.train.callbacks; "
        "heavy = [m for m in sys.modules if m.startswith(('speedasr.models', 'lhotse',"
        " 'speedasr.nn.attention', 'speedasr.kernels'))]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
