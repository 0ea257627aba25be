"""The ``canary-*`` presets have the real checkpoints' state-dict shapes.

NeMo's side is built without NeMo: ``nemo_shapes`` lists every key and shape of a canary AED state
dict from a NeMo config, after docs/canary.md's appendix, and is itself checked against the NeMo
fixture's real state dict. The published configs below give each model's numbers (sources in
``speedasr.models.sizing``). Each preset must build, from scratch, exactly the tensors that
``import-nemo`` maps a checkpoint of that config onto, and the same ``ModelConfig``.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from speedasr.models.aed import AEDModel
from speedasr.models.sizing import PRESETS, nemo_vocab_size
from speedasr.nemo.archive import NemoArchive, read_nemo
from speedasr.nemo.import_nemo import key_map, model_config

NEMO = Path(__file__).parents[1] / "fixtures" / "nemo" / "canary_tiny.nemo"

# Published numbers: model cards (layers, parameters), NeMo's fast-conformer_aed.yaml (heads 8,
# 256 subsampling channels, conv kernel 9, FFN 4x, 128 mel bins for Canary), tokenizer pieces.
PUBLISHED = {
    "canary-180m-flash": dict(d=512, layers=17, dec_d=1024, dec_layers=4, tokens=5248),
    "canary-1b-flash": dict(d=1024, layers=32, dec_d=1024, dec_layers=4, tokens=5248),
    # decoder depth: the count that gives the published 978M (see speedasr.models.sizing)
    "canary-1b-v2": dict(d=1024, layers=32, dec_d=1024, dec_layers=8, tokens=16384),
    "canary-1b": dict(d=1024, layers=24, dec_d=1024, dec_layers=24, tokens=4128),
}


def nemo_config(d: int, layers: int, dec_d: int, dec_layers: int, tokens: int) -> dict:
    """The model-shape keys of a Canary ``model_config.yaml`` (what import-nemo reads)."""
    return {
        "target": "nemo.collections.asr.models.aed_multitask_models.EncDecMultiTaskModel",
        "prompt_format": "canary2",
        "preprocessor": {"features": 128, "window_size": 0.025, "window_stride": 0.01},
        "encoder": {
            "d_model": d, "n_layers": layers, "n_heads": 8, "subsampling": "dw_striding",
            "subsampling_factor": 8, "subsampling_conv_channels": 256, "ff_expansion_factor": 4,
            "self_attention_model": "rel_pos", "conv_kernel_size": 9,
            "conv_norm_type": "batch_norm", "xscaling": True, "dropout": 0.1,
        },
        "transf_decoder": {"config_dict": {
            "hidden_size": dec_d, "inner_size": 4 * dec_d, "num_layers": dec_layers,
            "num_attention_heads": 8, "max_sequence_length": 1024, "pre_ln": True,
        }},
        "head": {"num_layers": 1, "log_softmax": True},
    }  # fmt: skip


def nemo_shapes(config: dict, vocab: int) -> dict[str, tuple[int, ...]]:
    """Every key of NeMo's state dict and its shape (docs/canary.md, appendix)."""
    enc, pre = config["encoder"], config["preprocessor"]
    dec = config["transf_decoder"]["config_dict"]
    d, c, f, k = enc["d_model"], enc["subsampling_conv_channels"], pre["features"], 0
    k = enc["conv_kernel_size"]
    dd, inner, heads = dec["hidden_size"], dec["inner_size"], enc["n_heads"]
    ff = enc["ff_expansion_factor"] * d
    freq = f
    for _ in range(3):
        freq = (freq + 1) // 2
    s = {"preprocessor.featurizer.window": (400,), "preprocessor.featurizer.fb": (1, f, 257)}
    p = "encoder.pre_encode"
    s |= {f"{p}.out.weight": (d, c * freq), f"{p}.out.bias": (d,)}
    s |= {f"{p}.conv.0.weight": (c, 1, 3, 3), f"{p}.conv.0.bias": (c,)}
    for i in (2, 5):
        s |= {f"{p}.conv.{i}.weight": (c, 1, 3, 3), f"{p}.conv.{i}.bias": (c,)}
    for i in (3, 6):
        s |= {f"{p}.conv.{i}.weight": (c, c, 1, 1), f"{p}.conv.{i}.bias": (c,)}

    def linear(name: str, n_out: int, n_in: int, bias: bool = True, conv: bool = False) -> dict:
        shape = (n_out, n_in, 1) if conv else (n_out, n_in)
        return {f"{name}.weight": shape, **({f"{name}.bias": (n_out,)} if bias else {})}

    def norm(name: str, n: int) -> dict:
        return {f"{name}.weight": (n,), f"{name}.bias": (n,)}

    for n in range(enc["n_layers"]):
        layer = f"encoder.layers.{n}"
        for i in (1, 2):
            s |= norm(f"{layer}.norm_feed_forward{i}", d)
            s |= linear(f"{layer}.feed_forward{i}.linear1", ff, d)
            s |= linear(f"{layer}.feed_forward{i}.linear2", d, ff)
        s |= norm(f"{layer}.norm_conv", d) | norm(f"{layer}.norm_self_att", d)
        s |= norm(f"{layer}.norm_out", d)
        s |= linear(f"{layer}.conv.pointwise_conv1", 2 * d, d, conv=True)
        s |= {f"{layer}.conv.depthwise_conv.weight": (d, 1, k)}
        s |= {f"{layer}.conv.depthwise_conv.bias": (d,)}
        s |= linear(f"{layer}.conv.pointwise_conv2", d, d, conv=True)
        bn = f"{layer}.conv.batch_norm"
        s |= {f"{bn}.{x}": (d,) for x in ("weight", "bias", "running_mean", "running_var")}
        s |= {f"{bn}.num_batches_tracked": ()}
        for x in ("q", "k", "v", "out"):
            s |= linear(f"{layer}.self_attn.linear_{x}", d, d)
        s |= linear(f"{layer}.self_attn.linear_pos", d, d, bias=False)
        s |= {f"{layer}.self_attn.pos_bias_{x}": (heads, d // heads) for x in "uv"}
    if dd != d:
        s |= linear("encoder_decoder_proj", dd, d)
    emb = "transf_decoder._embedding"
    s |= {f"{emb}.token_embedding.weight": (vocab, dd)}
    s |= {f"{emb}.position_embedding.pos_enc": (dec["max_sequence_length"], dd)}
    s |= norm(f"{emb}.layer_norm", dd) | norm("transf_decoder._decoder.final_layer_norm", dd)
    for n in range(dec["num_layers"]):
        layer = f"transf_decoder._decoder.layers.{n}"
        for i in (1, 2, 3):
            s |= norm(f"{layer}.layer_norm_{i}", dd)
        for sub in ("first_sub_layer", "second_sub_layer"):
            for x in ("query_net", "key_net", "value_net", "out_projection"):
                s |= linear(f"{layer}.{sub}.{x}", dd, dd)
        s |= linear(f"{layer}.third_sub_layer.dense_in", inner, dd)
        s |= linear(f"{layer}.third_sub_layer.dense_out", dd, inner)
    s |= linear("log_softmax.mlp.layer0", vocab, dd)
    return s


def imported_shapes(config: dict, vocab: int) -> tuple[object, dict[str, tuple[int, ...]]]:
    """The ``ModelConfig`` import-nemo makes of ``config`` and the speedasr tensor shapes its
    key map makes of NeMo's (q/k/v concatenated, 1x1 convolutions as Linear)."""
    archive = NemoArchive(Path("published.nemo"), config, b"", {})
    cfg = model_config(archive, vocab_size=vocab, pad_id=2)
    theirs = nemo_shapes(config, vocab)
    ours = {}
    for key, sources in key_map(cfg).items():
        shapes = [theirs[s] for s in sources]
        shape = (sum(x[0] for x in shapes), *shapes[0][1:]) if shapes[0] else ()
        if len(shape) == 3 and shape[-1] == 1 and "depthwise" not in key:
            shape = shape[:2]
        ours[key] = shape
    ours["decoder.output.weight"] = theirs["log_softmax.mlp.layer0.weight"]  # tied
    return cfg, ours


def test_nemo_shapes_are_the_fixtures():
    archive = read_nemo(NEMO)
    vocab = archive.state_dict["transf_decoder._embedding.token_embedding.weight"].shape[0]
    real = {k: tuple(v.shape) for k, v in archive.state_dict.items()}
    assert nemo_shapes(archive.config, vocab) == real


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_has_the_published_checkpoints_shapes(name):
    published = PUBLISHED[name]
    vocab = nemo_vocab_size(published["tokens"])
    imported, expected = imported_shapes(nemo_config(**published), vocab)
    preset = PRESETS[name]
    with torch.device("meta"):
        model = AEDModel(preset)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected

    # ... and is the config import-nemo builds, but for what only a real checkpoint can say.
    def settings(cfg) -> dict:  # decoder width/heads None means "as the encoder's"
        return {**asdict(cfg), "decoder_d_model": cfg.dec_d_model, "decoder_heads": cfg.dec_heads}

    differ = {k for k, v in settings(preset).items() if v != settings(imported)[k]}
    assert differ <= {"pad_id", "max_decoder_positions", "label_smoothing"}, differ


def test_vocabularies_are_padded_to_a_multiple_of_8():
    assert nemo_vocab_size(126) == 128 and nemo_vocab_size(5248) == 5248
    assert all(PRESETS[name].vocab_size % 8 == 0 for name in PUBLISHED)
