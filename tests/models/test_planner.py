import json

import pytest

from speedasr.cli import main
from speedasr.errors import UserError
from speedasr.models.aed import ModelConfig
from speedasr.models.planner import (
    Budget,
    Corpus,
    epoch_flops,
    inference_flops,
    plan,
    plan_configs,
)

# A config small enough to count by hand: d=8, ff=16, vocab 10, 1 encoder + 1 decoder layer.
SMALL = ModelConfig(
    vocab_size=10, n_mels=16, subsampling_channels=2, d_model=8, encoder_layers=1,
    encoder_heads=2, conv_kernel=3, decoder_layers=1, ff_mult=2, ctc_weight=0.0,
)  # fmt: skip
# One utterance of 0.16 s: 16 feature frames -> 2 encoder frames; 6.25 tokens/s -> 1 text token,
# + 4 prompt tokens = 5 decoder positions. Multiply-adds (MACs), by hand:
SUBSAMPLING = (
    8 * 8 * 2 * 9  # conv 1->2 ch, 3x3, on 8 frames x 8 mel bins (after stride 2)
    + 4 * 4 * 2 * 9
    + 4 * 4 * 2 * 2  # depthwise 3x3 + pointwise 2->2 on 4 x 4
    + 2 * 2 * 2 * 9
    + 2 * 2 * 2 * 2  # the same on 2 x 2
    + 2 * (2 * 2) * 8  # linear (channels x freq = 4) -> d_model, 2 frames
)  # = 1656
ENCODER_LAYER_PER_FRAME = (
    2 * (8 * 16 + 16 * 8)  # two half-step FFNs
    + 8 * 24
    + 8 * 8  # QKV + output projection
    + 8 * 16
    + 3 * 8
    + 8 * 8  # conv module: pointwise in (GLU), depthwise k=3, pointwise out
)  # = 984
ENCODER_ATTENTION = 2 * 2 * 2 * 8  # QK^T and PV: T'^2 * d each
DECODER_PER_TOKEN = 8 * 24 + 8 * 8 + 8 * 8 + 8 * 8 + 2 * 8 * 16  # self QKV/out, cross Q/out, FFN
DECODER_CROSS_KV = 2 * 8 * 16  # keys and values of the 2 encoder frames
OUTPUT = 5 * 8 * 10
DECODER_ATTENTION = 2 * 5 * 5 * 8 + 2 * 5 * 2 * 8  # causal self (counted as the full square), cross
MACS = (
    SUBSAMPLING + 2 * ENCODER_LAYER_PER_FRAME + ENCODER_ATTENTION
    + 5 * DECODER_PER_TOKEN + DECODER_CROSS_KV + OUTPUT + DECODER_ATTENTION
)  # fmt: skip
TRAIN_FLOPS_PER_UTTERANCE = 3 * 2 * MACS  # backward = 2x forward; 2 FLOPs per MAC
CORPUS = Corpus(hours=1.0, utterance_seconds=0.16, tokens_per_second=6.25)


def test_hand_count_is_what_we_think():
    assert SUBSAMPLING == 1656 and ENCODER_LAYER_PER_FRAME == 984 and MACS == 8104


def test_epoch_flops_match_the_hand_count():
    utterances_per_hour = 3600 / 0.16
    assert epoch_flops(SMALL, CORPUS) == pytest.approx(
        TRAIN_FLOPS_PER_UTTERANCE * utterances_per_hour, rel=1e-12
    )


def test_epochs_from_raw_flops_and_from_gpu_hours():
    per_epoch = TRAIN_FLOPS_PER_UTTERANCE * 22500  # 22500 utterances of 0.16 s in one hour
    rows = plan_configs(Budget(10 * per_epoch), CORPUS, {"small": SMALL})
    assert rows[0].epochs == pytest.approx(10.0, rel=1e-12) and rows[0].flag == "ok"
    gpu = Budget.from_gpu_hours(gpu_hours=1.0, peak_flops=1e6, mfu=0.5)
    assert gpu.flops == 1.8e9
    assert plan_configs(gpu, CORPUS, {"small": SMALL})[0].epochs == pytest.approx(
        1.8e9 / per_epoch, rel=1e-12
    )


def test_flags_many_epochs_and_under_one_epoch():
    per_epoch = TRAIN_FLOPS_PER_UTTERANCE * 22500
    flag = lambda budget: plan_configs(Budget(budget), CORPUS, {"s": SMALL})[0].flag  # noqa: E731
    assert flag(21 * per_epoch) == "many-epochs"
    assert flag(0.5 * per_epoch) == "under-one-epoch"
    assert flag(5 * per_epoch) == "ok"


def test_inference_flops_split_encoder_and_decoder_by_hand():
    f = inference_flops(SMALL, frames=16, tokens=1, prompt=4)
    assert f.encoder == 2 * (SUBSAMPLING + ENCODER_LAYER_PER_FRAME * 2 + ENCODER_ATTENTION)
    assert f.decoder == 2 * (5 * DECODER_PER_TOKEN + DECODER_CROSS_KV + OUTPUT + DECODER_ATTENTION)
    assert f.decoder_steps == 1


def test_prefers_deeper_narrower_shapes_at_equal_parameters():
    rows = plan(Budget(1e21), Corpus(hours=10_000), [100e6, 1e9], max_encoder_layers=32)
    for size in ("100M", "1B"):
        shapes = [r for r in rows if r.size == size]
        assert len(shapes) >= 3
        assert all(abs(r.params - shapes[0].params) < 0.15 * shapes[0].params for r in shapes)
        widths = [r.d_model for r in shapes]
        assert widths == sorted(widths)  # narrowest (deepest) first
        (preferred,) = [r for r in shapes if r.preferred]
        deeper = [r for r in shapes if r.encoder_layers > preferred.encoder_layers]
        assert preferred.encoder_layers <= 32 and all(r.encoder_layers > 32 for r in deeper)
    # a tiny budget flags every shape
    assert {r.flag for r in plan(Budget(1e15), Corpus(hours=10_000), [100e6])} == {
        "under-one-epoch"
    }


def test_command_table_and_json(capsys):
    assert main(["plan", "--flops", "1e20", "--corpus-hours", "1000", "--sizes", "30M"]) == 0
    out = capsys.readouterr().out
    assert "preferred" in out and "epochs" in out
    assert main(["plan", "--gpu-hours", "100", "--peak-tflops", "312", "--mfu", "0.35",
                 "--corpus-hours", "1000", "--sizes", "30M,100M", "--json"]) == 0  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    assert data["budget_flops"] == pytest.approx(100 * 3600 * 312e12 * 0.35)
    assert {r["size"] for r in data["rows"]} == {"30M", "100M"}


@pytest.mark.parametrize("argv, message", [
    (["--corpus-hours", "10"], "exactly one of"),
    (["--flops", "1e20", "--gpu-hours", "3", "--corpus-hours", "10"], "exactly one of"),
    (["--gpu-hours", "3", "--corpus-hours", "10"], "--peak-tflops"),
    (["--flops", "lots", "--corpus-hours", "10"], "cannot read --flops"),
    (["--flops", "1e20", "--corpus-hours", "0"], "corpus hours must be > 0"),
    (["--gpu-hours", "3", "--peak-tflops", "100", "--mfu", "2", "--corpus-hours", "1"], "MFU"),
])  # fmt: skip
def test_bad_input_is_one_line_error(argv, message, capsys):
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_budget_validation_in_python():
    with pytest.raises(UserError):
        Budget.from_gpu_hours(0, 1e12, 0.4)
