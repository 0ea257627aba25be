"""End to end: a tiny model trained for a few dozen steps, then `speedasr eval` / `transcribe`.

The WER test checks reproducibility of the number, not quality: `speedasr eval` on the validation
cuts must print the WER that training-time validation logged for the same weights and decoding.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import jiwer
import pytest
import torch

from speedasr.cli import main
from speedasr.data.tokenizer import Tokenizer
from speedasr.metrics import normalize_text
from speedasr.testing import make_tiny_cuts

STEPS = 30


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoint, cuts path, val/wer logged at the last step)."""
    root = tmp_path_factory.mktemp("trained")
    cuts = make_tiny_cuts(root / "data", 8, seed=3, speech=True)
    Tokenizer.train([c.supervisions[0].text for c in cuts], root / "tok", vocab_size=96)
    cuts_path = root / "data/cuts.jsonl.gz"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code = main([
            "train", f"--out_dir={root / 'exp'}", f"--data.train_cuts={cuts_path}",
            f"--data.dev_cuts={cuts_path}", f"--data.tokenizer={root / 'tok'}",
            "--data.num_workers=0", "--data.spec_augment.enabled=false",
            "--sampler.max_duration=12", "--sampler.num_buckets=2", "--sampler.num_token_buckets=1",
            "--model.d_model=32", "--model.encoder_layers=1", "--model.encoder_heads=2",
            "--model.decoder_layers=1", "--model.subsampling_channels=8", "--model.dropout=0.0",
            "--model.attention_backend=torch",
            "--optim.lr=0.003", "--optim.warmup_steps=5", "--optim.schedule=constant",
            f"--trainer.max_steps={STEPS}", "--trainer.max_epochs=null",
            f"--trainer.val_check_interval={STEPS}", "--trainer.check_val_every_n_epoch=null",
            "--trainer.enable_progress_bar=false", "--trainer.accelerator=cpu",
            "--trainer.devices=1", "--monitors.padding=false", "--monitors.gpu=false",
            "--monitors.throughput=false",
        ])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert code == 0
    metrics = list(csv.DictReader(open(next((root / "exp/logs").glob("version_*/metrics.csv")))))
    wers = [(int(r["step"]), float(r["val/wer"])) for r in metrics if r.get("val/wer")]
    assert wers, "validation logged no WER"
    return root / "exp/checkpoints/last.ckpt", root / "data/cuts.jsonl.gz", wers[-1][1]


def test_eval_reproduces_the_training_time_wer(trained, tmp_path, capsys):
    ckpt, cuts, val_wer = trained
    out = tmp_path / "summary.json"
    rows = tmp_path / "utts.jsonl"
    code = main(["eval", "--ckpt", str(ckpt), "--cuts", str(cuts), "--json", str(out),
                 "--out", str(rows), "--quiet", "--batch-duration", "5"])  # fmt: skip
    assert code == 0
    summary = json.loads(out.read_text())
    assert summary["wer"] == pytest.approx(val_wer, abs=1e-6)
    assert summary["utterances"] == 8 and summary["rtfx"] > 0
    assert summary["normalizer"] == "whisper_en"
    lines = [json.loads(line) for line in rows.read_text().splitlines()]
    counts = ("hits", "substitutions", "deletions", "insertions", "reference_words")
    assert len(lines) == 8 and set(lines[0]) == {"id", "ref", "hyp", "wer", *counts}
    assert any(line["hyp"] for line in lines)  # a number from real hypotheses, not from silence
    for line in lines:  # jiwer's own counts of the normalised pair
        ref, hyp = normalize_text(line["ref"]), normalize_text(line["hyp"])
        expected = jiwer.process_words(ref, hyp) if ref and hyp else None
        if expected is not None:
            assert [line[k] for k in counts[:4]] == [
                expected.hits,
                expected.substitutions,
                expected.deletions,
                expected.insertions,
            ]
        assert line["reference_words"] == len(ref.split())
    for key in counts:  # the corpus counts are the utterances' sums
        assert summary[key] == sum(line[key] for line in lines)
    edits = summary["substitutions"] + summary["deletions"] + summary["insertions"]
    assert summary["wer"] == pytest.approx(edits / summary["reference_words"])
    printed = capsys.readouterr().out
    assert (
        f"({summary['substitutions']} substitutions, {summary['deletions']} deletions, "
        f"{summary['insertions']} insertions in {summary['reference_words']} reference words; "
        "whisper_en normalizer)"
    ) in printed


def test_transcribe_cutset_and_audio_files_agree(trained, tmp_path, capsys):
    ckpt, cuts, _ = trained
    out = tmp_path / "hyps.jsonl"
    assert main(["transcribe", "--ckpt", str(ckpt), "--cuts", str(cuts), "--out", str(out),
                 "--quiet"]) == 0  # fmt: skip
    by_cut = {r["id"]: r["text"] for r in map(json.loads, out.read_text().splitlines())}
    assert len(by_cut) == 8
    audio = sorted((cuts.parent / "audio").glob("*.flac"))[:2]
    capsys.readouterr()
    assert main(["transcribe", "--ckpt", str(ckpt), "--quiet", "--batch-size", "1",
                 *map(str, audio)]) == 0  # fmt: skip
    printed = dict(line.split("\t", 1) for line in capsys.readouterr().out.splitlines())
    for path in audio:
        assert printed[str(path)] == by_cut[path.stem]


def test_beam_search_from_the_command_line(trained, tmp_path):
    ckpt, cuts, _ = trained
    out = tmp_path / "beam.json"
    assert main(["eval", "--ckpt", str(ckpt), "--cuts", str(cuts), "--json", str(out),
                 "--quiet", "--beam-size", "3", "--max-utterances", "3"]) == 0  # fmt: skip
    assert json.loads(out.read_text())["beam_size"] == 3


def test_normalizer_flag(trained, tmp_path, capsys):
    ckpt, cuts, _ = trained
    out = tmp_path / "none.json"
    assert main(["eval", "--ckpt", str(ckpt), "--cuts", str(cuts), "--json", str(out), "--quiet",
                 "--max-utterances", "2", "--normalizer", "none"]) == 0  # fmt: skip
    summary = json.loads(out.read_text())
    assert summary["normalizer"] == "none" and summary["utterances"] == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # argparse's exit, before any work
        main(["eval", "--ckpt", str(ckpt), "--cuts", str(cuts), "--normalizer", "en"])
    assert exit_info.value.code == 2
    assert "--normalizer: invalid choice: 'en'" in capsys.readouterr().err


def test_eval_in_bfloat16(trained, tmp_path):
    ckpt, cuts, _ = trained
    out, rows = tmp_path / "bf16.json", tmp_path / "bf16.jsonl"
    assert main(["eval", "--ckpt", str(ckpt), "--cuts", str(cuts), "--json", str(out), "--out",
                 str(rows), "--quiet", "--dtype", "bfloat16"]) == 0  # fmt: skip
    summary = json.loads(out.read_text())
    assert summary["dtype"] == "bfloat16" and summary["utterances"] == 8
    assert any(json.loads(line)["hyp"] for line in rows.read_text().splitlines())


@pytest.mark.parametrize("argv, message", [
    (["transcribe", "--ckpt", "x.ckpt"], "either audio files or --cuts"),
    (["transcribe", "--ckpt", "x.ckpt", "--beam-size", "0", "a.wav"], "beam_size must be >= 1"),
    (["eval", "--ckpt", "x.ckpt", "--cuts", "c", "--beam-size", "2", "--no-cache"], "use_cache"),
    (["eval", "--ckpt", "missing.ckpt", "--cuts", "c"], "does not exist"),
    (["eval", "--ckpt", "x.ckpt", "--cuts", "c", "--dtype", "float16"], "float16 needs a GPU"),
])  # fmt: skip
def test_bad_input_is_one_line_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_training_validation_decodes_with_the_shared_transcribe_batch():
    import speedasr.train.module as module
    from speedasr.decoding.transcribe import transcribe_batch

    assert module.transcribe_batch is transcribe_batch
    assert Path(module.__file__).is_file()


def test_transcribe_cuts_without_supervision_or_text(tmp_path, capsys):
    # Cuts to transcribe need no transcript: one without supervision, one whose supervision has
    # no text or language. Each transcribes as its audio file does (``cuts_from_audio``: empty
    # text, English prompt). An untrained model will do: the transcripts only have to agree.
    from dataclasses import asdict

    from lhotse import CutSet

    from speedasr.models.aed import AEDModel, ModelConfig
    from speedasr.testing import tiny_texts

    tokenizer = Tokenizer.train(tiny_texts(40, seed=1), tmp_path / "tok", vocab_size=96)
    config = ModelConfig(
        vocab_size=96, pad_id=tokenizer.pad_id, d_model=32, encoder_layers=1, encoder_heads=2,
        decoder_layers=1, subsampling_channels=8, dropout=0.0, attention_backend="torch",
    )  # fmt: skip
    torch.manual_seed(0)
    model = AEDModel(config)
    ckpt = tmp_path / "untrained.ckpt"
    torch.save({
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "hyper_parameters": {"model": asdict(config)}, "tokenizer": tokenizer.to_state(),
    }, ckpt)  # fmt: skip
    no_sup, no_text = make_tiny_cuts(tmp_path / "data", 2, seed=5)
    no_sup = no_sup.with_id("no-supervision")
    no_sup.supervisions = []
    no_text.supervisions[0].text = no_text.supervisions[0].language = None
    CutSet.from_cuts([no_sup, no_text]).to_file(tmp_path / "cuts.jsonl.gz")

    code = main(["transcribe", "--ckpt", str(ckpt), "--cuts", str(tmp_path / "cuts.jsonl.gz"),
                 "--quiet"])  # fmt: skip
    printed = dict(line.split("\t", 1) for line in capsys.readouterr().out.splitlines())
    assert code == 0 and set(printed) == {no_sup.id, no_text.id}
    audio = [c.recording.sources[0].source for c in (no_sup, no_text)]
    assert main(["transcribe", "--ckpt", str(ckpt), "--quiet", *audio]) == 0
    from_audio = dict(line.split("\t", 1) for line in capsys.readouterr().out.splitlines())
    assert [printed[no_sup.id], printed[no_text.id]] == [from_audio[a] for a in audio]
