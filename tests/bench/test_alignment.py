import json

import torch

from speedasr.bench.alignment import EOT_ID, SOT_ID, OracleTask
from speedasr.cli import main


def test_oracle_features_are_each_tokens_prototype_for_1_to_3_encoder_frames():
    task = OracleTask(text_tokens=10, n_mels=6, noise=0.0, seed=0)
    for transcript in task.transcripts(5):
        feats = task.features(transcript, torch.Generator().manual_seed(0))
        n = len(transcript)
        assert len(feats) % 8 == 0 and 8 * n <= len(feats) <= 24 * n
        # Without noise every frame is exactly one token's prototype, in transcript order.
        frame_tokens = [
            next(t for t in set(transcript) if torch.equal(f, task.prototypes[t])) for f in feats
        ]
        runs = [t for i, t in enumerate(frame_tokens) if i == 0 or t != frame_tokens[i - 1]]
        collapsed = [t for i, t in enumerate(transcript) if i == 0 or t != transcript[i - 1]]
        assert runs == collapsed
    batch = task.batch([transcript], torch.Generator().manual_seed(0))
    assert batch.tokens.tolist() == [SOT_ID, *transcript]
    assert batch.targets.tolist() == [*transcript, EOT_ID]


def test_command_trains_measures_and_writes_json(tmp_path, capsys):
    out = tmp_path / "a.json"
    args = ["bench", "alignment", "--steps", "4", "--eval-every", "2", "--batch-size", "4",
            "--transcripts", "20", "--eval-utterances", "3", "--threads", "1", "--json", str(out),
            "--model.d_model=32", "--model.encoder_heads=2", "--model.subsampling_channels=4",
            "--model.encoder_layers=1", "--model.absolute_memory_positions=true"]  # fmt: skip
    assert main(args) == 0
    rows = json.loads(out.read_text())
    assert [r["step"] for r in rows] == [2, 4]
    assert all(r["attention_wer"] >= 0 and r["ctc_wer"] >= 0 and r["ce"] > 0 for r in rows)
    assert rows[0]["config"]["absolute_memory_positions"] is True
    assert rows[0]["config"]["d_model"] == 32


def test_bad_arguments_are_one_line(capsys):
    assert main(["bench", "alignment", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert main(["bench", "alignment", "--model.d_model=33"]) == 2
    assert "divisible" in capsys.readouterr().err
    assert main(["bench", "alignment", "--model.absolute_memory_positions=ture"]) == 2
    assert "expected true or false, got 'ture'" in capsys.readouterr().err
    assert main(["bench", "alignment", "--model.absolute_memory_position=true"]) == 2
    assert "did you mean --model.absolute_memory_positions?" in capsys.readouterr().err
