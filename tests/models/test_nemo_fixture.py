"""Integrity of the NeMo Canary reference fixture (tests/fixtures/nemo/, made by
tools/nemo_fixture/make_fixture.py with nemo-toolkit), checked without NeMo: the .nemo archive's
layout, a state dict with every learned value randomised, outputs of consistent shapes, and the
documented facts (docs/canary.md) that can be checked from the files alone: prompt tokens, aggregate
id offsets, subsampled lengths, feature normalisation, the fixed tables NeMo stores."""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
import yaml

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "nemo"
NEMO = FIXTURE / "canary_tiny.nemo"
# Buffers that are fixed functions of the config; the fixture keeps NeMo's values for them.
DERIVED = {
    "preprocessor.featurizer.fb",
    "preprocessor.featurizer.window",
    "transf_decoder._embedding.position_embedding.pos_enc",
}
CANARY2_EN_PNC = [
    "<|startofcontext|>",
    "<|startoftranscript|>",
    "<|emo:undefined|>",
    "<|en|>",
    "<|en|>",
    "<|pnc|>",
    "<|noitn|>",
    "<|notimestamp|>",
    "<|nodiarize|>",
]


@pytest.fixture(scope="module")
def archive() -> dict[str, bytes]:
    # "r:" opens an uncompressed tar only: NeMo's save_to writes one.
    with tarfile.open(NEMO, "r:") as tar:
        return {
            m.name.removeprefix("./"): tar.extractfile(m).read()
            for m in tar.getmembers()
            if m.isfile()
        }


@pytest.fixture(scope="module")
def config(archive) -> dict:
    return yaml.safe_load(archive["model_config.yaml"])


@pytest.fixture(scope="module")
def state(archive) -> dict[str, torch.Tensor]:
    return torch.load(io.BytesIO(archive["model_weights.ckpt"]), weights_only=True)


@pytest.fixture(scope="module")
def outputs() -> dict:
    return torch.load(FIXTURE / "outputs.pt", weights_only=True)


@pytest.fixture(scope="module")
def tokenizers(archive, config) -> dict[str, spm.SentencePieceProcessor]:
    out = {}
    for lang, spec in config["tokenizer"]["langs"].items():
        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(archive[spec["model_path"].removeprefix("nemo:")])
        out[lang] = sp
    return out


def test_archive_holds_config_weights_and_tokenizers(archive, config):
    assert {"model_config.yaml", "model_weights.ckpt"} <= archive.keys()
    for lang in ("spl_tokens", "en"):
        spec = config["tokenizer"]["langs"][lang]
        for key in ("model_path", "vocab_path", "spe_tokenizer_vocab"):
            assert spec[key].removeprefix("nemo:") in archive, (lang, key)
    assert (FIXTURE / "README.md").is_file()


def test_config_is_the_documented_canary_shape(config):
    assert config["prompt_format"] == "canary2"
    assert config["tokenizer"]["type"] == "agg"
    assert list(config["tokenizer"]["langs"]) == ["spl_tokens", "en"]
    enc, dec = config["encoder"], config["transf_decoder"]["config_dict"]
    assert config["model_defaults"]["asr_enc_hidden"] == enc["d_model"]
    assert config["model_defaults"]["lm_dec_hidden"] == dec["hidden_size"]
    assert enc["d_model"] != dec["hidden_size"]  # so encoder_decoder_proj exists
    assert (enc["self_attention_model"], enc["conv_norm_type"]) == ("rel_pos", "batch_norm")
    assert (enc["subsampling"], enc["subsampling_factor"], enc["xscaling"]) == (
        "dw_striding",
        8,
        True,
    )
    assert enc["n_layers"] == dec["num_layers"] == 2
    assert config["preprocessor"]["features"] == enc["feat_in"] == 128


def test_every_learned_value_is_randomised(state):
    floats = {k: v for k, v in state.items() if v.is_floating_point() and k not in DERIVED}
    # No tensor keeps a constant init (zeros for biases and pos_bias_u/v, ones for norm weights,
    # identity BatchNorm statistics).
    constant = [k for k, v in floats.items() if v.numel() > 1 and bool((v == v.flatten()[0]).all())]
    assert constant == []
    assert any(k.endswith("self_attn.pos_bias_u") for k in floats)
    for k, v in floats.items():
        if k.endswith("running_var"):
            assert bool((v > 0).all()) and not torch.allclose(v, torch.ones_like(v)), k
        if k.endswith("running_mean"):
            assert v.abs().max() > 0.1, k


def test_head_is_tied_to_embedding_and_vocabulary_padded_to_8(state, tokenizers):
    emb = state["transf_decoder._embedding.token_embedding.weight"]
    assert torch.equal(state["log_softmax.mlp.layer0.weight"], emb)
    real = sum(sp.get_piece_size() for sp in tokenizers.values())
    assert emb.shape[0] == 8 * math.ceil(real / 8) > real  # the fixture has padding rows


def test_fixed_tables_follow_their_formulas(state):
    window = state["preprocessor.featurizer.window"]
    torch.testing.assert_close(window, torch.hann_window(400, periodic=False), rtol=0, atol=1e-7)
    assert state["preprocessor.featurizer.fb"].shape == (1, 128, 257)
    pos_enc = state["transf_decoder._embedding.position_embedding.pos_enc"]
    n, d = pos_enc.shape
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float64) * (-math.log(10000.0) / d))
    expected = torch.zeros(n, d, dtype=torch.float64)
    expected[:, 0::2], expected[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
    torch.testing.assert_close(pos_enc.double(), expected / math.sqrt(d), rtol=0, atol=2e-5)


def _subsampled(frames: int) -> int:
    for _ in range(3):  # dw_striding x8: three (kernel 3, stride 2, padding 1) convolutions
        frames = (frames - 1) // 2 + 1
    return frames


@pytest.mark.parametrize("utt", [0, 1, 2])
def test_outputs_have_consistent_shapes(outputs, config, utt):
    enc_d, dec_d = (
        config["encoder"]["d_model"],
        config["transf_decoder"]["config_dict"]["hidden_size"],
    )
    o = {k.split(".", 1)[1]: v for k, v in outputs.items() if k.startswith(f"utt{utt}.")}
    n_audio = round(float(outputs["durations"][utt]) * 16000)
    assert o["audio"].shape == (n_audio,) and o["audio"].dtype == torch.float32
    assert o["feature_length"] == n_audio // 160
    assert o["features"].shape == (128, o["feature_length"])
    assert o["encoder_length"] == _subsampled(o["feature_length"])
    assert o["encoder_output"].shape == (o["encoder_length"], enc_d)
    assert o["encoder_projected"].shape == (o["encoder_length"], dec_d)
    n_in = len(o["target_ids"]) - 1
    assert o["decoder_log_probs"].shape == (n_in, 128)
    torch.testing.assert_close(
        o["decoder_log_probs"].logsumexp(-1), torch.zeros(n_in), rtol=0, atol=1e-5
    )
    assert torch.equal(o["target_ids"][: len(o["prompt_ids"])], o["prompt_ids"])
    assert torch.equal(o["greedy_ids"][: len(o["prompt_ids"])], o["prompt_ids"])
    assert len(o["greedy_ids"]) <= o["encoder_length"] + 8
    generated = o["greedy_ids"][len(o["prompt_ids"]) :]
    assert o["greedy_log_probs"].shape == (len(generated), 128)
    assert torch.equal(o["greedy_log_probs"].argmax(-1), generated)
    # Three different lengths, so packed/padded layouts differ.
    assert len({round(float(d) * 100) for d in outputs["durations"]}) == 3


@pytest.mark.parametrize("utt", [0, 1, 2])
def test_token_ids_follow_the_aggregate_tokenizer(outputs, tokenizers, utt):
    spl, en = tokenizers["spl_tokens"], tokenizers["en"]
    prompt = outputs[f"utt{utt}.prompt_ids"].tolist()
    assert [spl.id_to_piece(i) for i in prompt] == CANARY2_EN_PNC
    target = outputs[f"utt{utt}.target_ids"].tolist()
    assert spl.id_to_piece(target[-1]) == "<|endoftext|>"
    text_ids = target[len(prompt) : -1]
    offset = spl.get_piece_size()  # en ids follow the spl_tokens ids
    assert min(text_ids) >= offset
    assert en.decode([i - offset for i in text_ids]) == outputs[f"utt{utt}.text"]


@pytest.mark.parametrize("utt", [0, 1, 2])
def test_features_follow_the_documented_recipe(outputs, state, utt):
    """docs/canary.md's preprocessor recipe, from the audio and the stored window and filterbank."""
    audio = outputs[f"utt{utt}.audio"].double()
    n = outputs[f"utt{utt}.feature_length"]
    x = torch.cat([audio[:1], audio[1:] - 0.97 * audio[:-1]])
    window = torch.nn.functional.pad(state["preprocessor.featurizer.window"].double(), (56, 56))
    spec = torch.stft(
        x, 512, 160, window=window, center=True, pad_mode="constant", return_complex=True
    )
    mel = state["preprocessor.featurizer.fb"][0].double() @ spec.abs().pow(2)
    logmel = torch.log(mel + 2**-24)[:, :n]
    mean = logmel.mean(1, keepdim=True)
    std = logmel.std(1, keepdim=True)  # unbiased
    expected = (logmel - mean) / (std + 1e-5)
    torch.testing.assert_close(outputs[f"utt{utt}.features"].double(), expected, rtol=0, atol=1e-4)
