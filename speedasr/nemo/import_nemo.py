"""``speedasr import-nemo MODEL.nemo --out DIR``: a NeMo Canary ``.nemo`` as a speedasr checkpoint.

The mapping is docs/canary.md: the NeMo config becomes a ``ModelConfig`` (options NeMo's Canary
uses: rel_pos, xscaling, BatchNorm, absolute decoder positions without rotary, the NeMo front end,
a tied head with its own bias), and every tensor of the state dict goes to exactly one speedasr
tensor (q/k/v concatenated into the fused projections). A config speedasr cannot compute exactly
is refused with the key that differs; a NeMo key that maps nowhere, or a speedasr tensor nothing
maps to, is an error that lists them. The fixed tables NeMo stores (the decoder's position table,
the tied head's second copy) are checked against what speedasr computes and then dropped.

``DIR`` receives ``model.ckpt`` (a speedasr checkpoint, loadable with ``weights_only=True``) and
``nemo/``: the original ``model_config.yaml`` and tokenizer files, byte for byte. ``DIR`` must be
new or empty (``--overwrite``: replace the ``model.ckpt`` and ``nemo/`` of an earlier import), so an
import never mixes its files with another model's or overwrites a checkpoint unasked.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import sentencepiece as spm
import torch

from speedasr.core.geometry import SAMPLE_RATE
from speedasr.data.nemo_tokenizer import AggregateTokenizer
from speedasr.errors import UserError
from speedasr.models.aed import AEDModel, ModelConfig
from speedasr.nemo.archive import NemoArchive, artifact_name, read_nemo
from speedasr.nn.filterbank import (
    NEMO_HOP_LENGTH,
    NEMO_N_FFT,
    NEMO_PREEMPHASIS,
    NEMO_WIN_LENGTH,
)
from speedasr.nn.positions import sinusoidal_positions

CHECKPOINT_NAME = "model.ckpt"
NEMO_FILES_DIR = "nemo"
POS_TABLE_TOLERANCE = 1e-5
"""Max |difference| allowed between NeMo's stored decoder position table and speedasr's sinusoids
(both float32 sin/cos of the same products; measured 0 to ~1e-7)."""


# --- config ------------------------------------------------------------------------------------
def _require(path: Path, key: str, value: object, allowed: tuple, why: str) -> None:
    if value not in allowed:
        raise UserError(
            f"'{path}': {key} is {value!r}; speedasr imports only "
            f"{' or '.join(map(repr, allowed))} ({why})"
        )


def model_config(archive: NemoArchive, vocab_size: int, pad_id: int) -> ModelConfig:
    """The ``ModelConfig`` computing what the archive's NeMo model computes (eval mode)."""
    cfg, path = archive.config, archive.path
    target = str(cfg.get("target", ""))
    if target and not target.endswith("EncDecMultiTaskModel"):
        raise UserError(f"'{path}' holds a {target}, not a Canary EncDecMultiTaskModel")
    _require(path, "prompt_format", cfg.get("prompt_format"), ("canary", "canary2"), "§7.2")
    enc = cfg.get("encoder") or {}
    dec = (cfg.get("transf_decoder") or {}).get("config_dict") or {}
    pre = cfg.get("preprocessor") or {}
    head = cfg.get("head") or {}
    if not enc or not dec:
        raise UserError(f"'{path}': model_config.yaml has no encoder or transf_decoder.config_dict")

    def req(section: dict, prefix: str, key: str, default, allowed: tuple, why: str) -> None:
        _require(path, f"{prefix}.{key}", section.get(key, default), allowed, why)

    req(enc, "encoder", "self_attention_model", "rel_pos", ("rel_pos",), "relative positions")
    req(enc, "encoder", "subsampling", "striding", ("dw_striding",), "FastConformer subsampling")
    req(enc, "encoder", "subsampling_factor", 4, (8,), "three stride-2 stages")
    req(enc, "encoder", "conv_norm_type", "batch_norm", ("batch_norm",), "conv-module BatchNorm")
    req(enc, "encoder", "causal_downsampling", False, (False,), "streaming models")
    req(enc, "encoder", "conv_context_style", "regular", ("regular",), "streaming models")
    req(enc, "encoder", "conv_context_size", None, (None,), "symmetric conv padding")
    req(enc, "encoder", "use_bias", True, (True,), "biases in every projection")
    req(enc, "encoder", "reduction", None, (None,), "no time reduction")
    if list(enc.get("att_context_size") or [-1, -1]) != [-1, -1]:
        raise UserError(f"'{path}': encoder.att_context_size is limited; speedasr needs [-1, -1]")
    d_model = int(enc["d_model"])
    feat_out = enc.get("feat_out", -1)
    if feat_out not in (None, -1, 0, d_model):
        raise UserError(f"'{path}': encoder.feat_out {feat_out} adds an output projection")
    if int((cfg.get("transf_encoder") or {}).get("num_layers", 0)) != 0:
        raise UserError(f"'{path}': transf_encoder.num_layers > 0 is not supported")
    req(dec, "transf_decoder.config_dict", "pre_ln", False, (True,), "pre-LN decoder")
    req(dec, "transf_decoder.config_dict", "learn_positional_encodings", False, (False,), "§6.1")
    req(dec, "transf_decoder.config_dict", "num_token_types", 0, (0,), "no token types")
    req(dec, "transf_decoder.config_dict", "hidden_act", "relu", ("relu",), "ReLU FFN")
    req(cfg["transf_decoder"], "transf_decoder", "pre_ln_final_layer_norm", True, (True,), "§6.2")
    req(head, "head", "num_layers", 1, (1,), "one tied Linear")
    req(head, "head", "log_softmax", True, (True,), "log-probabilities")
    # The front end: speedasr.nn.filterbank computes Canary's settings only (docs/canary.md §3).
    window = round(float(pre.get("window_size", 0.02)) * SAMPLE_RATE)
    hop = round(float(pre.get("window_stride", 0.01)) * SAMPLE_RATE)
    for key, value, allowed in (
        ("sample_rate", pre.get("sample_rate", 16000), (SAMPLE_RATE,)),
        ("window_size (samples)", window, (NEMO_WIN_LENGTH,)),
        ("window_stride (samples)", hop, (NEMO_HOP_LENGTH,)),
        ("n_fft", pre.get("n_fft", NEMO_N_FFT), (NEMO_N_FFT,)),
        ("window", pre.get("window", "hann"), ("hann",)),
        ("normalize", pre.get("normalize", "per_feature"), ("per_feature",)),
        ("preemph", pre.get("preemph", NEMO_PREEMPHASIS), (NEMO_PREEMPHASIS,)),
        ("log", pre.get("log", True), (True,)),
        ("frame_splicing", pre.get("frame_splicing", 1), (1,)),
        ("mag_power", pre.get("mag_power", 2.0), (2.0,)),
        ("log_zero_guard_type", pre.get("log_zero_guard_type", "add"), ("add",)),
        ("log_zero_guard_value", pre.get("log_zero_guard_value", 2**-24), (2**-24,)),
        ("mel_norm", pre.get("mel_norm", "slaney"), ("slaney",)),
        ("lowfreq", pre.get("lowfreq", 0), (0,)),
        ("highfreq", pre.get("highfreq"), (None, SAMPLE_RATE / 2)),
    ):
        _require(path, f"preprocessor.{key}", value, allowed, "NeMo front end, §3")
    ff_mult = int(enc.get("ff_expansion_factor", 4))
    dec_d = int(dec["hidden_size"])
    if int(dec["inner_size"]) != ff_mult * dec_d:
        raise UserError(
            f"'{path}': decoder inner_size {dec['inner_size']} is not encoder "
            f"ff_expansion_factor {ff_mult} x hidden_size {dec_d} (speedasr has one ff_mult)"
        )
    channels = enc.get("subsampling_conv_channels", -1)
    return ModelConfig(
        vocab_size=vocab_size, pad_id=pad_id, n_mels=int(pre.get("features", 64)),
        subsampling="dw_striding",
        subsampling_channels=d_model if channels in (None, -1) else int(channels),
        d_model=d_model, encoder_layers=int(enc["n_layers"]), encoder_heads=int(enc["n_heads"]),
        conv_kernel=int(enc.get("conv_kernel_size", 31)), block_out_norm=True,
        encoder_positions="rel_pos", xscaling=bool(enc.get("xscaling", True)), conv_norm="batch",
        decoder_layers=int(dec["num_layers"]), decoder_d_model=dec_d,
        decoder_heads=int(dec["num_attention_heads"]), ff_mult=ff_mult, tie_embeddings=True,
        absolute_token_positions=True, token_position_scale=None, decoder_rotary=False,
        frontend="nemo", dropout=float(enc.get("dropout", 0.1)), ctc_weight=0.0,
        max_decoder_positions=int(dec.get("max_sequence_length", 512)),
        label_smoothing=float((cfg.get("loss") or {}).get("label_smoothing", 0.0)),
    )  # fmt: skip


# --- state dict --------------------------------------------------------------------------------
def key_map(config: ModelConfig) -> dict[str, tuple[str, ...]]:
    """speedasr key -> the NeMo keys it is made of (several: concatenated along dim 0)."""
    m: dict[str, tuple[str, ...]] = {"frontend.window": ("preprocessor.featurizer.window",)}
    m["frontend.fb"] = ("preprocessor.featurizer.fb",)
    sub, pre = "encoder.subsampling", "encoder.pre_encode"
    subsampling = (
        ("convs.0", "conv.0"), ("convs.1.0", "conv.2"), ("convs.1.1", "conv.3"),
        ("convs.2.0", "conv.5"), ("convs.2.1", "conv.6"), ("out", "out"),
    )  # fmt: skip
    for ours, theirs in subsampling:
        for p in ("weight", "bias"):
            m[f"{sub}.{ours}.{p}"] = (f"{pre}.{theirs}.{p}",)
    wb = ("weight", "bias")
    for n in range(config.encoder_layers):
        ours, theirs = f"encoder.blocks.{n}", f"encoder.layers.{n}"
        pairs = [
            ("ff1_norm", "norm_feed_forward1"), ("ff1.up", "feed_forward1.linear1"),
            ("ff1.down", "feed_forward1.linear2"), ("attn_norm", "norm_self_att"),
            ("attn.proj", "self_attn.linear_out"), ("conv_norm", "norm_conv"),
            ("conv.pointwise_in", "conv.pointwise_conv1"),
            ("conv.depthwise", "conv.depthwise_conv"),
            ("conv.pointwise_out", "conv.pointwise_conv2"), ("ff2_norm", "norm_feed_forward2"),
            ("ff2.up", "feed_forward2.linear1"), ("ff2.down", "feed_forward2.linear2"),
            ("out_norm", "norm_out"),
        ]  # fmt: skip
        for a, b in pairs:
            for p in wb:
                m[f"{ours}.{a}.{p}"] = (f"{theirs}.{b}.{p}",)
        for p in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            m[f"{ours}.conv.norm.{p}"] = (f"{theirs}.conv.batch_norm.{p}",)
        for p in wb:
            m[f"{ours}.attn.qkv.{p}"] = tuple(f"{theirs}.self_attn.linear_{x}.{p}" for x in "qkv")
        m[f"{ours}.attn.linear_pos.weight"] = (f"{theirs}.self_attn.linear_pos.weight",)
        for p in ("pos_bias_u", "pos_bias_v"):
            m[f"{ours}.attn.{p}"] = (f"{theirs}.self_attn.{p}",)
    emb = "transf_decoder._embedding"
    m["decoder.embed.weight"] = (f"{emb}.token_embedding.weight",)
    for p in wb:
        m[f"decoder.embed_norm.{p}"] = (f"{emb}.layer_norm.{p}",)
        m[f"decoder.norm.{p}"] = ("transf_decoder._decoder.final_layer_norm." + p,)
        if config.dec_d_model != config.d_model:
            m[f"decoder.memory_proj.{p}"] = (f"encoder_decoder_proj.{p}",)
    m["decoder.output.bias"] = ("log_softmax.mlp.layer0.bias",)
    for n in range(config.decoder_layers):
        ours, theirs = f"decoder.blocks.{n}", f"transf_decoder._decoder.layers.{n}"
        first, second = f"{theirs}.first_sub_layer", f"{theirs}.second_sub_layer"
        for p in wb:
            for a, b in (("self_norm", "layer_norm_1"), ("cross_norm", "layer_norm_2"),
                         ("ff_norm", "layer_norm_3"), ("ff.up", "third_sub_layer.dense_in"),
                         ("ff.down", "third_sub_layer.dense_out")):  # fmt: skip
                m[f"{ours}.{a}.{p}"] = (f"{theirs}.{b}.{p}",)
            m[f"{ours}.self_attn.qkv.{p}"] = tuple(
                f"{first}.{x}_net.{p}" for x in ("query", "key", "value")
            )
            m[f"{ours}.self_attn.proj.{p}"] = (f"{first}.out_projection.{p}",)
            m[f"{ours}.cross_attn.q.{p}"] = (f"{second}.query_net.{p}",)
            m[f"{ours}.cross_attn.kv.{p}"] = (f"{second}.key_net.{p}", f"{second}.value_net.{p}")
            m[f"{ours}.cross_attn.proj.{p}"] = (f"{second}.out_projection.{p}",)
    return m


CHECKED_NOT_MAPPED = (
    "transf_decoder._embedding.position_embedding.pos_enc",
    "log_softmax.mlp.layer0.weight",
)
"""NeMo keys that speedasr computes or shares instead of storing; ``map_state_dict`` checks
them against what speedasr uses."""


def map_state_dict(
    archive: NemoArchive, config: ModelConfig, model: AEDModel
) -> dict[str, torch.Tensor]:
    """NeMo's state dict -> ``model``'s, every key accounted for (``UserError`` lists the rest)."""
    nemo, path = archive.state_dict, archive.path
    sources_of = key_map(config)
    ours = model.state_dict()
    del ours["decoder.output.weight"]  # tied: the same tensor as decoder.embed.weight
    unmapped_ours = sorted(set(ours) - set(sources_of))
    used = {k for keys in sources_of.values() for k in keys} | set(CHECKED_NOT_MAPPED)
    missing = sorted(k for k in used if k not in nemo)
    unused = sorted(set(nemo) - used)
    if unmapped_ours or missing or unused:
        parts = []
        if missing:
            parts.append(f"missing NeMo keys: {', '.join(missing)}")
        if unused:
            parts.append(f"NeMo keys speedasr does not use: {', '.join(unused)}")
        if unmapped_ours:
            parts.append(f"speedasr tensors with no NeMo source: {', '.join(unmapped_ours)}")
        raise UserError(f"'{path}': the state dict does not map onto speedasr: {'; '.join(parts)}")
    out = {}
    for key, sources in sources_of.items():
        tensor = torch.cat([nemo[s] for s in sources]) if len(sources) > 1 else nemo[sources[0]]
        if tensor.ndim == ours[key].ndim + 1 and tensor.shape[-1] == 1:  # Conv1d 1x1 -> Linear
            tensor = tensor.squeeze(-1)
        if tensor.shape != ours[key].shape:
            raise UserError(
                f"'{path}': {' + '.join(sources)} has shape {tuple(tensor.shape)}, speedasr's "
                f"{key} needs {tuple(ours[key].shape)} (config and weights disagree)"
            )
        out[key] = tensor.to(ours[key].dtype).clone()
    head = nemo["log_softmax.mlp.layer0.weight"]
    if not torch.equal(head, out["decoder.embed.weight"]):
        raise UserError(f"'{path}': the head weight is not tied to the token embedding")
    out["decoder.output.weight"] = out["decoder.embed.weight"]
    table = nemo["transf_decoder._embedding.position_embedding.pos_enc"].float()
    positions = torch.arange(table.shape[0])
    expected = sinusoidal_positions(positions, table.shape[1]) / math.sqrt(table.shape[1])
    error = float((table - expected).abs().max())
    if error > POS_TABLE_TOLERANCE:
        raise UserError(
            f"'{path}': the decoder position table differs from fixed sinusoids / sqrt(width) "
            f"by {error:.2e} (learned positions are not supported)"
        )
    return out


def _pad_id(archive: NemoArchive) -> tuple[int, str]:
    """The ``<pad>`` id of the aggregate tokenizer (in ``spl_tokens``, the first model) and the
    prompt format."""
    langs = ((archive.config.get("tokenizer") or {}).get("langs")) or {}
    offset = 0
    for lang, entry in langs.items():
        name = artifact_name((entry or {}).get("model_path"))
        if name not in archive.files:
            raise UserError(f"'{archive.path}': tokenizer '{lang}' file {name!r} is not inside it")
        sp = spm.SentencePieceProcessor()
        sp.load_from_serialized_proto(archive.files[name])
        pad = sp.piece_to_id("<pad>")
        if sp.id_to_piece(pad) == "<pad>":
            return offset + pad, lang
        offset += sp.get_piece_size()
    raise UserError(f"'{archive.path}': no tokenizer holds a <pad> token")


def tokenizer_state(archive: NemoArchive) -> dict:
    """Self-contained tokenizer state for the checkpoint: the aggregate's SentencePiece models in
    config order (bytes) and the prompt format; checked by building a prompt."""
    langs = ((archive.config.get("tokenizer") or {}).get("langs")) or {}
    state = {
        "kind": "nemo_aggregate",
        "prompt_format": archive.config.get("prompt_format"),
        "langs": [
            [lang, archive.files[artifact_name(e["model_path"])]] for lang, e in langs.items()
        ],
    }
    tokenizer = AggregateTokenizer.from_state(state)
    if not tokenizer.languages:
        raise UserError(f"'{archive.path}': the tokenizer has no language besides spl_tokens")
    tokenizer.prompt(tokenizer.languages[0])
    return state


class Imported(NamedTuple):
    checkpoint: Path
    """``out_dir/model.ckpt``."""
    model: AEDModel
    """The imported model (eval mode not set)."""
    skipped: list[str]
    """Archive members not imported (NeMo's optional timestamps model)."""


def check_out_dir(out: Path, overwrite: bool) -> None:
    """``UserError`` unless ``out`` is new or an empty directory (or ``overwrite``)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' exists and is not a directory")
    if not overwrite and out.is_dir() and any(out.iterdir()):
        raise UserError(
            f"--out '{out}' is not empty: give a new or empty directory, or --overwrite to "
            f"replace its {CHECKPOINT_NAME} and {NEMO_FILES_DIR}/"
        )


def import_nemo(path: str | Path, out_dir: str | Path, overwrite: bool = False) -> Imported:
    """Write ``out_dir/model.ckpt`` and ``out_dir/nemo/*``. ``out_dir`` must be new or empty
    unless ``overwrite`` (then the files of ``out_dir/nemo/`` are replaced by this model's)."""
    out = Path(out_dir)
    check_out_dir(out, overwrite)  # before the archive is read: it may be gigabytes
    archive = read_nemo(path)
    emb = archive.state_dict.get("transf_decoder._embedding.token_embedding.weight")
    if emb is None:
        raise UserError(f"'{path}': no transf_decoder._embedding.token_embedding.weight")
    pad_id, _ = _pad_id(archive)
    config = model_config(archive, vocab_size=emb.shape[0], pad_id=pad_id)
    model = AEDModel(config)
    model.load_state_dict(map_state_dict(archive, config, model), strict=True)
    files = out / NEMO_FILES_DIR
    if files.is_dir():  # overwrite: an earlier model's tokenizer files must not stay beside ours
        for old in files.iterdir():
            if old.is_file() or old.is_symlink():
                old.unlink()
    files.mkdir(parents=True, exist_ok=True)
    (files / "model_config.yaml").write_bytes(archive.config_bytes)
    for name, data in archive.files.items():
        (files / name).write_bytes(data)
    ckpt = out / CHECKPOINT_NAME
    torch.save(
        {
            "hyper_parameters": {"model": asdict(config)},
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "tokenizer": tokenizer_state(archive),
            "global_step": 0,
            # What export-nemo writes back besides the weights: the original config and files.
            "nemo": {
                "source": str(Path(path).name),
                "config": archive.config_bytes,
                "files": dict(archive.files),
            },
        },
        ckpt,
    )
    return Imported(ckpt, model, archive.skipped)


def load_imported(path: str | Path) -> tuple[AEDModel, dict]:
    """The model (eval mode) and the raw checkpoint dict of an ``import-nemo`` checkpoint."""
    from speedasr.checkpoint import read_checkpoint, saved_model_config

    ckpt = read_checkpoint(path)
    try:
        config = saved_model_config(ckpt["hyper_parameters"]["model"], path)
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"'{path}' is not a speedasr checkpoint (missing {e})") from None
    model = AEDModel(config)
    model.load_state_dict(state, strict=True)
    return model.eval(), ckpt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("nemo", help="a NeMo Canary .nemo file (EncDecMultiTaskModel)")
    parser.add_argument(
        "--out", required=True,
        help="new or empty directory for model.ckpt and nemo/ (config, tokenizers)",
    )  # fmt: skip
    parser.add_argument(
        "--overwrite", "--force", dest="overwrite", action="store_true",
        help="write into a non-empty --out: replace its model.ckpt and nemo/",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    ckpt, model, skipped = import_nemo(args.nemo, args.out, overwrite=args.overwrite)
    params = sum(p.numel() for p in model.parameters())
    cfg = model.cfg
    if skipped:
        print(f"not imported (NeMo's optional timestamps model): {', '.join(skipped)}")
    print(
        f"imported {args.nemo}: {params:,} parameters, encoder {cfg.encoder_layers}x{cfg.d_model}, "
        f"decoder {cfg.decoder_layers}x{cfg.dec_d_model}, vocabulary {cfg.vocab_size}; "
        f"wrote {ckpt} and {Path(args.out) / NEMO_FILES_DIR}/"
    )
    return 0
