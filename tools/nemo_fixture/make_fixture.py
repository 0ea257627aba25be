"""Build the tiny NeMo Canary reference fixture (tests/fixtures/nemo/) with NeMo itself.

Run with the Python of a separate virtualenv that has nemo-toolkit (see README.md beside this file):

    /work/nemo-venv/bin/python tools/nemo_fixture/make_fixture.py --out tests/fixtures/nemo

It writes
  canary_tiny.nemo  a canary2 ``EncDecMultiTaskModel`` saved by ``save_to``: FastConformer encoder
      (rel_pos attention, BatchNorm conv module, dw_striding x8, xscaling), Transformer decoder,
      encoder width 48 != decoder width 64 (so ``encoder_decoder_proj`` exists), aggregate
      tokenizer (``spl_tokens`` + ``en`` SentencePiece models trained here). Every learned parameter
      and every BatchNorm statistic is drawn at random: NeMo's fresh init zeroes ``pos_bias_u/v``
      and biases and gives BatchNorm identity statistics, which would hide mis-mapped keys.
  outputs.pt  NeMo's outputs for 3 utterances of different lengths, each run alone (batch of 1), as
      plain tensors (``torch.load(..., weights_only=True)``); see tests/fixtures/nemo/README.md.

Everything is a pure function of ``--seed``: a rerun gives the same bytes for outputs.pt and the
same state dict (the .nemo tar holds file times and random artifact names, so its bytes differ).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
# speedasr.prep.sentences imports only the standard library, so the NeMo venv can use it for text.
sys.path.insert(0, str(REPO))
from speedasr.prep.sentences import SentenceGenerator  # noqa: E402

SAMPLE_RATE = 16000
TRANSFORMER = "nemo.collections.asr.modules.transformer"
ENC_D, ENC_HEADS = 48, 3
DEC_D, DEC_HEADS = 64, 2
N_MELS = 128
EN_VOCAB = 100  # spl_tokens (26) + en (100) = 126, padded by NeMo to 128: two padding rows
# Durations (seconds) of the 3 utterances; not multiples of the 10 ms hop or of the x8 subsampling.
DURATIONS = (0.713, 1.529, 2.618)
# Special tokens of the fixture's spl_tokens model, beyond CanaryTokenizer.DEFAULT_TOKENS
# (<|nospeech|> <pad> <|endoftext|> <|startoftranscript|> <|pnc|> <|nopnc|>): what the canary2
# prompt of an en -> en transcription needs, plus a second language so <|en|> is not the last id.
EXTRA_SPECIAL = [
    "<|startofcontext|>",
    "<|emo:undefined|>",
    "<|emo:neutral|>",
    "<|emo:angry|>",
    "<|emo:happy|>",
    "<|emo:sad|>",
    "<|itn|>",
    "<|noitn|>",
    "<|timestamp|>",
    "<|notimestamp|>",
    "<|diarize|>",
    "<|nodiarize|>",
    "<|transcribe|>",
    "<|translate|>",
    "<|en|>",
    "<|de|>",
    "<|spkchange|>",
    "<|audioseparator|>",
]


def sentences(seed: int, n: int) -> list[str]:
    """n sentences of speedasr's embedded corpus grammar, with first-letter capital and a full stop
    (Canary's pnc text)."""
    gen = SentenceGenerator(random.Random(seed))
    out = []
    for _ in range(n):
        s = " ".join(gen.sentence())
        out.append(s[:1].upper() + s[1:] + ".")
    return out


def build_tokenizers(work: Path, seed: int) -> tuple[Path, Path]:
    import sentencepiece as spm
    from nemo.collections.common.tokenizers.canary_tokenizer import CanaryTokenizer
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model

    spm.set_random_generator_seed(seed)
    # Relative paths: model_config.yaml records the folders (tokenizer.langs.*.dir).
    os.chdir(work)
    spl_dir = Path("spl_tokens")
    CanaryTokenizer.build_special_tokenizer(EXTRA_SPECIAL, spl_dir)
    en_dir = Path("en")
    text = Path("en_text.txt")
    text.write_text("\n".join(sentences(seed, 400)) + "\n")
    # As NeMo's scripts/tokenizers/process_asr_text_tokenizer.py does for one language: BPE,
    # no bos/eos, case kept.
    create_spt_model(
        str(text),
        vocab_size=EN_VOCAB,
        sample_size=-1,
        do_lower_case=False,
        tokenizer_type="bpe",
        output_dir=str(en_dir),
    )
    return spl_dir, en_dir


def model_config(spl_dir: Path, en_dir: Path) -> dict:
    """fast-conformer_aed.yaml (NeMo examples/asr/conf/speech_multitask) shrunk, with the Canary
    release settings (128 mel, canary2 prompt, xscaling) and dropout left on (eval disables it)."""
    return {
        "sample_rate": SAMPLE_RATE,
        "label_smoothing": 0.0,
        "context_len_for_AR_decoding": 5,
        "log_prediction": False,
        "prompt_format": "canary2",
        "restore_timestamps_model": False,
        "model_defaults": {"asr_enc_hidden": ENC_D, "lm_enc_hidden": DEC_D, "lm_dec_hidden": DEC_D},
        "tokenizer": {
            "dir": None,
            "type": "agg",
            "langs": {
                "spl_tokens": {"dir": str(spl_dir), "type": "bpe"},
                "en": {"dir": str(en_dir), "type": "bpe"},
            },
            "custom_tokenizer": {
                "_target_": "nemo.collections.common.tokenizers.canary_tokenizer.CanaryTokenizer",
                "tokenizer": None,
            },
        },
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": SAMPLE_RATE,
            "normalize": "per_feature",
            "window_size": 0.025,
            "window_stride": 0.01,
            "window": "hann",
            "features": N_MELS,
            "n_fft": 512,
            "log": True,
            "frame_splicing": 1,
            "dither": 1e-5,
            "pad_to": 0,
            "pad_value": 0.0,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": N_MELS,
            "feat_out": -1,
            "n_layers": 2,
            "d_model": ENC_D,
            "subsampling": "dw_striding",
            "subsampling_factor": 8,
            "subsampling_conv_channels": 32,
            "causal_downsampling": False,
            "ff_expansion_factor": 4,
            "self_attention_model": "rel_pos",
            "n_heads": ENC_HEADS,
            "att_context_size": [-1, -1],
            "xscaling": True,
            "untie_biases": True,
            "pos_emb_max_len": 5000,
            "conv_kernel_size": 9,
            "conv_norm_type": "batch_norm",
            "conv_context_size": None,
            "dropout": 0.1,
            "dropout_pre_encoder": 0.1,
            "dropout_emb": 0.0,
            "dropout_att": 0.1,
        },
        "transf_encoder": {
            "_target_": f"{TRANSFORMER}.transformer_encoders.TransformerEncoder",
            "num_layers": 0,
            "hidden_size": DEC_D,
            "inner_size": 4 * DEC_D,
            "num_attention_heads": DEC_HEADS,
            "ffn_dropout": 0.1,
            "attn_score_dropout": 0.1,
            "attn_layer_dropout": 0.1,
            "mask_future": False,
            "pre_ln": True,
            "pre_ln_final_layer_norm": True,
        },
        "transf_decoder": {
            "_target_": f"{TRANSFORMER}.get_nemo_transformer",
            "model_name": None,
            "pretrained": False,
            "encoder": None,
            "pre_ln_final_layer_norm": True,
            "config_dict": {
                "max_sequence_length": 512,
                "num_token_types": 0,
                "embedding_dropout": 0.1,
                "learn_positional_encodings": False,
                "hidden_size": DEC_D,
                "inner_size": 4 * DEC_D,
                "num_layers": 2,
                "num_attention_heads": DEC_HEADS,
                "ffn_dropout": 0.1,
                "attn_score_dropout": 0.1,
                "attn_layer_dropout": 0.1,
                "hidden_act": "relu",
                "pre_ln": True,
                "vocab_size": None,
            },
        },
        "head": {
            "_target_": "nemo.collections.asr.parts.submodules.token_classifier.TokenClassifier",
            "num_layers": 1,
            "activation": "relu",
            "log_softmax": True,
            "hidden_size": DEC_D,
            "num_classes": None,
            "dropout": 0.0,
            "use_transformer_init": True,
        },
        "loss": {
            "_target_": "nemo.collections.common.losses.SmoothedCrossEntropyLoss",
            "label_smoothing": 0.0,
            "pad_id": None,
        },
    }


# Buffers that are fixed functions of the config (mel filterbank, STFT window, the decoder's
# sinusoid table) keep NeMo's values: every real checkpoint carries them unchanged, and an importer
# that computes them itself is checked against them here.
DERIVED_BUFFERS = (
    "preprocessor.featurizer.fb",
    "preprocessor.featurizer.window",
    "transf_decoder._embedding.position_embedding.pos_enc",
)


@torch.no_grad()
def randomise(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Overwrite every learned parameter and every BatchNorm statistic with random values of a
    sensible scale, so that no key keeps an init value (zeros, ones) that a wrong mapping would
    also produce."""
    for name, p in model.named_parameters():  # tied weights appear once
        leaf = name.rsplit(".", 1)[-1]
        module = model.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(module, torch.nn.BatchNorm1d | torch.nn.LayerNorm) and leaf == "weight":
            p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
        elif leaf == "bias" or leaf.startswith("pos_bias"):
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        else:
            fan_in = p[0].numel() if p.dim() > 1 else p.numel()
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm1d):
            m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(torch.empty(m.running_var.shape).uniform_(0.5, 2.0, generator=gen))
            m.num_batches_tracked.fill_(1000)


def waveform(seconds: float, seed: int) -> torch.Tensor:
    """Deterministic speech-like test signal: gliding harmonics under a syllable-rate envelope,
    plus low noise. (n_samples,) float32 in [-1, 1]."""
    gen = torch.Generator().manual_seed(seed)
    n = round(seconds * SAMPLE_RATE)
    t = torch.arange(n, dtype=torch.float64) / SAMPLE_RATE
    f0 = 110 + 60 * torch.rand(1, generator=gen, dtype=torch.float64)
    glide = 1 + 0.15 * torch.sin(2 * math.pi * 0.7 * t)
    phase = 2 * math.pi * torch.cumsum(f0 * glide, 0) / SAMPLE_RATE
    x = sum(torch.sin(k * phase) / k for k in range(1, 8))
    envelope = (
        0.5 * (1 - torch.cos(2 * math.pi * 4.0 * t)) * torch.hann_window(n, dtype=torch.float64)
    )
    noise = 0.02 * torch.randn(n, generator=gen, dtype=torch.float64)
    x = 0.3 * x * envelope + noise
    return (x / x.abs().max() * 0.9).to(torch.float32)


def canary2_turns(text: str, pnc: bool = True) -> list[dict]:
    """The canary2 dialog of an en -> en transcription (NeMo's defaults for the optional slots)."""
    return [
        {
            "role": "user",
            "slots": {
                "decodercontext": "",
                "emotion": "<|emo:undefined|>",
                "source_lang": "<|en|>",
                "target_lang": "<|en|>",
                "pnc": "<|pnc|>" if pnc else "<|nopnc|>",
                "itn": "<|noitn|>",
                "timestamp": "<|notimestamp|>",
                "diarize": "<|nodiarize|>",
                "prompt_language": "spl_tokens",
            },
        },
        {"role": "assistant", "slots": {"text": text, "prompt_language": "en"}},
    ]


@torch.no_grad()
def reference_outputs(model, seed: int) -> dict:
    """NeMo's outputs per utterance, each run alone (batch of 1)."""
    texts = sentences(seed + 1, len(DURATIONS))
    out: dict = {"durations": torch.tensor(DURATIONS, dtype=torch.float64)}
    for i, seconds in enumerate(DURATIONS):
        if any(m.training for m in model.modules()):
            raise RuntimeError("a module is in train mode: dropout would change the outputs")
        audio = waveform(seconds, seed + 10 + i)
        audio_len = torch.tensor([audio.numel()])
        feats, feat_len = model.preprocessor(input_signal=audio[None], length=audio_len)
        encoded, enc_len = model.encoder(audio_signal=feats, length=feat_len)
        # NeMo's preprocessor emits feature_length + 1 frames (the last zeroed); for some lengths
        # that frame survives the subsampling as an encoder frame past encoder_length (152
        # feature frames: 20 encoder frames, length 19). Keep the valid frames only,
        # as a per-utterance (packed) implementation sees them. NeMo's own forward masks the extra
        # frame out of cross-attention with lens_to_mask, which gives the same decoder outputs.
        n_feat, n_enc = int(feat_len[0]), int(enc_len[0])
        encoded = encoded[:, :, :n_enc]
        enc_states = model.encoder_decoder_proj(encoded.transpose(1, 2))
        enc_mask = torch.ones(enc_states.shape[:2], dtype=enc_states.dtype)
        enc = model.prompt.encode_dialog(canary2_turns(texts[i]))
        prompt_ids = enc["context_ids"].to(torch.long)
        tokens = enc["input_ids"].to(torch.long)  # prompt + text + <|endoftext|>
        dec_in = tokens[:-1][None]
        dec_states = model.transf_decoder(
            input_ids=dec_in,
            decoder_mask=torch.ones_like(dec_in, dtype=enc_states.dtype),
            encoder_embeddings=enc_states,
            encoder_mask=enc_mask,
        )
        log_probs = model.log_softmax(hidden_states=dec_states)
        # NeMo's greedy generator (what TransformerAEDGreedyInfer runs), from the prompt. Called
        # directly: TransformerAEDGreedyInfer.forward puts the decoder back in train mode (dropout
        # on) when it returns.
        greedy = model.decoding.decoding.greedy_search(
            encoder_hidden_states=enc_states,
            encoder_input_mask=enc_mask,
            decoder_input_ids=prompt_ids[None],
        )[0][0]
        # The decoder's log-probs along the greedy path (one full forward, which NeMo's cached
        # steps equal): row k scores greedy[len(prompt) + k], for checking a cached decoder
        # numerically (a random model's greedy ids repeat one token, which argmax alone checks
        # weakly).
        path = greedy[:-1][None].to(torch.long)
        path_states = model.transf_decoder(
            input_ids=path,
            decoder_mask=torch.ones_like(path, dtype=enc_states.dtype),
            encoder_embeddings=enc_states,
            encoder_mask=enc_mask,
        )
        greedy_log_probs = model.log_softmax(hidden_states=path_states)[0, len(prompt_ids) - 1 :]
        if not torch.equal(greedy_log_probs.argmax(-1), greedy[len(prompt_ids) :].to(torch.long)):
            raise RuntimeError("NeMo's greedy ids differ from the argmax of its full forward")
        u = f"utt{i}"
        out[f"{u}.text"] = texts[i]
        out[f"{u}.audio"] = audio
        # (n_mels, feature_length): NeMo's last frame (always masked to pad_value 0) is dropped.
        out[f"{u}.features"] = feats[0, :, :n_feat].contiguous()
        out[f"{u}.feature_length"] = n_feat
        out[f"{u}.encoder_output"] = encoded[
            0
        ].T.contiguous()  # (encoder_length, ENC_D), before proj
        out[f"{u}.encoder_length"] = n_enc
        out[f"{u}.encoder_projected"] = enc_states[0]  # (enc_frames, DEC_D)
        out[f"{u}.prompt_ids"] = prompt_ids
        out[f"{u}.target_ids"] = tokens  # prompt + text ids + eos; decoder input is [:-1]
        out[f"{u}.decoder_log_probs"] = log_probs[0]  # (len(target_ids) - 1, padded vocab)
        # prompt + generated; NeMo stops at <|endoftext|> or at min(512, encoder_length + 8) tokens
        out[f"{u}.greedy_ids"] = greedy.to(torch.long)
        out[f"{u}.greedy_log_probs"] = greedy_log_probs  # (len(greedy_ids) - len(prompt_ids), V)
        out[f"{u}.greedy_text"] = model.tokenizer.ids_to_text(greedy[len(prompt_ids) :].tolist())
    return out


@torch.no_grad()
def padded_batch_error(model, out: dict) -> dict[str, float]:
    """Max error, relative to the largest magnitude, of NeMo's own padded forward of all utterances
    in one batch (``EncDecMultiTaskModel.forward``) against the per-utterance outputs: how far
    NeMo itself is from "padding changes nothing"."""
    n = len(DURATIONS)
    audio = [out[f"utt{i}.audio"] for i in range(n)]
    audio_len = torch.tensor([a.numel() for a in audio])
    batch = torch.zeros(n, int(audio_len.max()))
    dec_in = [out[f"utt{i}.target_ids"][:-1] for i in range(n)]
    dec_len = torch.tensor([t.numel() for t in dec_in])
    tokens = torch.full((n, int(dec_len.max())), model.tokenizer.pad_id, dtype=torch.long)
    for i in range(n):
        batch[i, : audio_len[i]] = audio[i]
        tokens[i, : dec_len[i]] = dec_in[i]
    log_probs, _, memory, _ = model(
        input_signal=batch,
        input_signal_length=audio_len,
        transcript=tokens,
        transcript_length=dec_len,
    )
    feats, feat_len = model.preprocessor(input_signal=batch, length=audio_len)
    encoded, _ = model.encoder(audio_signal=feats, length=feat_len)
    errors = dict.fromkeys(
        ("features", "encoder_output", "encoder_projected", "decoder_log_probs"), 0.0
    )
    for i in range(n):
        f, e, t = out[f"utt{i}.feature_length"], out[f"utt{i}.encoder_length"], int(dec_len[i])
        mine = {
            "features": feats[i, :, :f],
            "encoder_output": encoded[i, :, :e].T,
            "encoder_projected": memory[i, :e],
            "decoder_log_probs": log_probs[i, :t],
        }
        for key, value in mine.items():
            ref = out[f"utt{i}.{key}"]
            errors[key] = max(errors[key], float((value - ref).abs().max() / ref.abs().max()))
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()

    import nemo
    from nemo.collections.asr.models import EncDecMultiTaskModel
    from nemo.collections.asr.parts.submodules.multitask_decoding import MultiTaskDecodingConfig
    from omegaconf import OmegaConf

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        spl_dir, en_dir = build_tokenizers(Path(tmp), args.seed)
        cfg = OmegaConf.create(model_config(spl_dir, en_dir))
        # NeMo's greedy AED decoder, at most 8 tokens past the prompt (random weights rarely end).
        cfg.decoding = OmegaConf.merge(
            OmegaConf.structured(MultiTaskDecodingConfig),
            {"strategy": "greedy", "greedy": {"max_generation_delta": 8}},
        )
        model = EncDecMultiTaskModel(cfg=cfg)
        randomise(model, torch.Generator().manual_seed(args.seed))
        model.eval()
        nemo_path = args.out / "canary_tiny.nemo"
        model.save_to(str(nemo_path))
        os.chdir(REPO)

    # Outputs from the model as NeMo restores it, so the fixture is what restore_from gives.
    restored = EncDecMultiTaskModel.restore_from(str(nemo_path), map_location="cpu")
    restored.eval()
    before = model.state_dict()
    for k, v in restored.state_dict().items():
        if not torch.equal(v, before[k]):
            raise SystemExit(f"restore_from changed {k}")
    outputs = reference_outputs(restored, args.seed)
    outputs["versions"] = json.dumps({"nemo_toolkit": nemo.__version__, "torch": torch.__version__})
    torch.save(outputs, args.out / "outputs.pt")
    restored.eval()
    errors = padded_batch_error(restored, outputs)
    print(
        "NeMo padded batch vs alone, max relative error:",
        {k: f"{v:.1e}" for k, v in errors.items()},
    )
    with tarfile.open(nemo_path) as tar:
        names = tar.getnames()
    print(f"wrote {nemo_path} ({nemo_path.stat().st_size} bytes): {names}")
    print(f"wrote {args.out / 'outputs.pt'} ({(args.out / 'outputs.pt').stat().st_size} bytes)")


if __name__ == "__main__":
    main()
