import json
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from speedasr.cli import main
from speedasr.core.batch import PaddedBatch
from speedasr.core.geometry import num_input_frames
from speedasr.core.segments import Segments
from speedasr.data.nemo_tokenizer import AggregateTokenizer
from speedasr.errors import UserError
from speedasr.models.aed import AEDModel, ModelConfig
from speedasr.models.sizing import (
    PRESETS,
    PUBLISHED_PARAMS,
    config_from_budget,
    count_flops,
    count_parameters,
    preset,
    subsampling_params,
)
from speedasr.nemo.archive import read_nemo
from speedasr.nemo.import_nemo import tokenizer_state


def real_counts(cfg: ModelConfig) -> tuple[int, int, int]:
    with torch.device("meta"):  # no memory: works for the 1B presets too
        m = AEDModel(cfg)
    count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
    return count(m.encoder), count(m.decoder), count(m)


CONFIGS = [
    *PRESETS.values(),
    ModelConfig(d_model=96, encoder_heads=2, decoder_d_model=64, decoder_heads=4, n_mels=64),
    ModelConfig(tie_embeddings=False, ctc_weight=0.0, conv_kernel=31, ff_mult=2),
    ModelConfig(absolute_token_positions=True, absolute_memory_positions=True),
    ModelConfig(
        encoder_positions="rel_pos",
        conv_norm="batch",
        xscaling=True,
        encoder_heads=16,
        decoder_heads=4,
    ),  # odd encoder head dim (9): allowed with rel_pos
    ModelConfig(subsampling_factor=4),
    ModelConfig(subsampling_factor=16, n_mels=128),
    ModelConfig(subsampling="stacking"),
    ModelConfig(subsampling="stacking", subsampling_factor=4, n_mels=64),
    ModelConfig(subsampling="stacking", subsampling_factor=16, subsampling_channels=1),
]


@pytest.mark.parametrize("cfg", CONFIGS)
def test_closed_form_parameters_match_the_model(cfg):
    p = count_parameters(cfg)
    assert (p.encoder, p.decoder, p.total) == real_counts(cfg)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_canary_presets_within_5_percent_of_published(name):
    total = count_parameters(PRESETS[name]).total
    assert abs(total / PUBLISHED_PARAMS[name] - 1) < 0.05


def test_cpu_presets_sizes():
    assert 2e6 <= count_parameters(PRESETS["tiny"]).total <= 5e6
    assert PRESETS["tiny"] == ModelConfig()  # the config defaults are the tiny preset
    assert count_parameters(PRESETS["small"]).total > 4 * count_parameters(PRESETS["tiny"]).total


def test_stacking_parameters_are_one_linear_map():
    for factor in (4, 8, 16):
        cfg = ModelConfig(subsampling="stacking", subsampling_factor=factor)
        assert subsampling_params(cfg) == factor * cfg.n_mels * cfg.d_model + cfg.d_model
        with torch.device("meta"):
            sub = AEDModel(cfg).encoder.subsampling
        assert subsampling_params(cfg) == sum(p.numel() for p in sub.parameters())


@pytest.mark.parametrize("subsampling", ["dw_striding", "stacking"])
@pytest.mark.parametrize("factor", [4, 8])
def test_flops_match_torch_flop_counter(factor, subsampling):
    # One utterance in a padded batch of one: every matmul/conv is real work, nothing is skipped.
    cfg = ModelConfig(
        vocab_size=50, n_mels=24, subsampling_channels=4, d_model=32, encoder_layers=2,
        encoder_heads=2, decoder_layers=2, decoder_d_model=48, decoder_heads=2, dropout=0.0,
        ctc_weight=0.3, attention_backend="torch", subsampling_factor=factor,
        subsampling=subsampling,
    )  # fmt: skip
    frames, tokens = 203, 11
    torch.manual_seed(0)
    model = AEDModel(cfg).eval()
    segs = Segments.from_lengths([frames]), Segments.from_lengths([tokens])
    batch = PaddedBatch(
        features=torch.randn(1, frames, 24), feature_segments=segs[0],
        tokens=torch.randint(2, 50, (1, tokens)), targets=torch.randint(2, 50, (1, tokens)),
        token_segments=segs[1], prompt_lengths=(1,),
    )  # fmt: skip
    with FlopCounterMode(display=False) as counter:
        model(batch)
    measured = counter.get_total_flops()
    want = count_flops(cfg, frames, tokens)
    dense = want.encoder_dense + want.decoder_dense + want.ctc_head
    attention = want.encoder_attention + want.decoder_attention
    # torch's counter sees SDPA only on some backends (not on CPU in torch 2.13)
    assert measured in (dense, dense + attention)


def test_budget_planner_recovers_canary_shapes():
    canary = dict(vocab_size=5248, n_mels=128, subsampling_channels=256, tie_embeddings=False,
                  ctc_weight=0.0)  # fmt: skip
    cfg = config_from_budget(880e6, encoder_share=0.91, **canary)
    assert cfg.d_model == 1024 and abs(count_parameters(cfg).total / 880e6 - 1) < 0.05
    assert cfg.encoder_layers in range(30, 35) and cfg.decoder_layers in range(3, 6)
    small = config_from_budget(3.5e6, encoder_share=0.8)
    total = count_parameters(small)
    assert abs(total.total / 3.5e6 - 1) < 0.15 and 0.7 < total.encoder / total.total < 0.9
    with pytest.raises(UserError):
        config_from_budget(1e6, encoder_share=1.5)


def test_preset_overrides_and_unknown_preset():
    assert preset("tiny", vocab_size=1024).vocab_size == 1024
    assert preset("canary-1b-flash").encoder_layers == 32
    with pytest.raises(UserError, match="unknown model preset"):
        preset("canary-7b")


def test_model_info_command(capsys):
    assert main(["model", "info", "tiny", "canary-1b-flash"]) == 0
    out = capsys.readouterr().out
    assert "canary-1b-flash" in out and "883M" in out and "tiny" in out
    assert main(["model", "info", "--budget", "20M", "--encoder-share", "0.8", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)["budget-20M"]
    assert info["params_total"] == count_parameters(ModelConfig(**info["config"])).total
    assert info["train_gflops_per_audio_second"] > 0
    assert main(["model", "info", "nope"]) == 2
    assert main(["model", "info", "tiny", "--model.d_model=100"]) == 2  # head dim must be even
    assert "error" in capsys.readouterr().err


def _info_json(capsys, *args: str) -> dict:
    assert main(["model", "info", "tiny", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)["tiny"]


def test_model_info_takes_train_override_syntax(capsys):
    """``--model.KEY=VALUE`` (and ``--model.KEY VALUE``) as in ``speedasr train``, typed from
    ModelConfig; the parameter count follows the closed form of the overridden config."""
    info = _info_json(capsys, "--model.d_model=256", "--model.tie_embeddings", "false",
                      "--model.decoder_d_model=null", "--model.rope_base=5e3")  # fmt: skip
    cfg = replace(PRESETS["tiny"], d_model=256, tie_embeddings=False, rope_base=5000.0)
    assert info["config"] == asdict(cfg)
    assert info["params_total"] == count_parameters(cfg).total
    # The spelling with underscores of a dashed option reads the same.
    assert _info_json(capsys, "--tokens_per_second", "2") == _info_json(
        capsys, "--tokens-per-second", "2"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model.d_modle=256"], "--model.d_modle; did you mean --model.d_model?"),
        (["--modle.d_model=256"], "--modle.d_model; did you mean --model.d_model?"),
        (["--model.d_model=abc"], "--model.d_model=abc: expected an integer, got 'abc'"),
        (["--model.tie_embeddings=flase"], "--model.tie_embeddings=flase: expected true or false"),
        (["--model.decoder_heads=x"], "--model.decoder_heads=x: expected an integer or null"),
        (["--model.attention_backend=cuda"], "expected one of auto, torch, triton, flash_attn"),
        (["--model.subsampling=foo"],
         "--model.subsampling=foo: expected one of dw_striding, stacking, got 'foo'"),
        (["--model.d_model"], "--model.d_model needs a value"),
    ],
)  # fmt: skip
def test_model_info_bad_overrides_are_one_line_errors(capsys, args, message):
    assert main(["model", "info", "tiny", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_deprecated_set_still_works_with_a_note(capsys):
    """``--set KEY=VALUE`` is read for one release: same config, and a one-line note."""
    new = _info_json(capsys, "--model.d_model=256", "--model.absolute_token_positions=true")
    assert main(["model", "info", "tiny", "--json", "--set", "d_model=256",
                 "absolute_token_positions=true"]) == 0  # fmt: skip
    out, err = capsys.readouterr()
    assert json.loads(out)["tiny"] == new
    assert "--set is deprecated" in err and "--model.d_model=256" in err


def test_a_typo_in_a_bool_override_is_an_error(capsys):
    """The old parser read anything but 1/true/yes as False, so a typo silently set False."""
    assert main(["model", "info", "tiny", "--set", "tie_embeddings=flase"]) == 2
    assert "expected true or false, got 'flase'" in capsys.readouterr().err


def test_flops_scale_with_layers():
    cfg = PRESETS["canary-1b"]
    a = count_flops(cfg, 1000, 44)
    b = count_flops(replace(cfg, decoder_layers=48), 1000, 44)
    assert b.encoder_dense == a.encoder_dense and b.decoder_attention == 2 * a.decoder_attention


NEMO = Path(__file__).parents[1] / "fixtures" / "nemo" / "canary_tiny.nemo"


def test_model_info_counts_each_presets_own_prompt(capsys):
    """A preset's decoder FLOPs count the prompt of the tokenizer it is trained with: NeMo's
    canary2 prompt (9 tokens: the fixture checkpoint's own prompt, built by its tokenizer) for
    canary-1b-flash, canary's 5 for canary-1b, speedasr's 4 for tiny."""
    state = tokenizer_state(read_nemo(NEMO))
    canary2 = len(AggregateTokenizer.from_state(state).prompt("en"))
    canary = len(AggregateTokenizer.from_state({**state, "prompt_format": "canary"}).prompt("en"))
    assert (canary2, canary) == (9, 5)
    duration, text_tokens = 10.0, 40  # model info's defaults: 10 s at 4 text tokens/s
    assert main(["model", "info", "tiny", "canary-1b", "canary-1b-flash", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for name, prompt in (("tiny", 4), ("canary-1b", canary), ("canary-1b-flash", canary2)):
        flops = count_flops(preset(name), num_input_frames(duration), prompt + text_tokens)
        assert info[name]["train_gflops_per_audio_second"] == pytest.approx(
            flops.training / duration / 1e9, rel=1e-12
        ), name
    assert [info[n]["prompt_tokens"] for n in ("tiny", "canary-1b", "canary-1b-flash")] == [
        4, canary, canary2,
    ]  # fmt: skip
