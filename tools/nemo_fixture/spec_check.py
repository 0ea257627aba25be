"""docs/canary.md in executable form: NeMo's Canary forward pass written out from the document, one
utterance at a time, in float64 plain PyTorch, and compared with NeMo's outputs in the fixture.

    .venv/bin/python tools/nemo_fixture/spec_check.py [tests/fixtures/nemo]

It needs torch and pyyaml only (no NeMo, no speedasr). It is a check of the document, not an
implementation to import: every step is the row of docs/canary.md named in its comment. It prints
the max error per output relative to the output's largest magnitude, and exits 1 above 1e-5.
"""

from __future__ import annotations

import io
import math
import sys
import tarfile
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

DT = torch.float64


class Spec:
    def __init__(self, nemo: Path) -> None:
        with tarfile.open(nemo, "r:") as tar:
            weights = tar.extractfile("./model_weights.ckpt").read()
            self.cfg = yaml.safe_load(tar.extractfile("./model_config.yaml").read())
        state = torch.load(io.BytesIO(weights), weights_only=True)
        self.sd = {k: v.to(DT) if v.is_floating_point() else v for k, v in state.items()}
        enc = self.cfg["encoder"]
        self.d, self.heads, self.n_layers = enc["d_model"], enc["n_heads"], enc["n_layers"]
        self.xscale = math.sqrt(self.d) if enc.get("xscaling", True) else 1.0  # "xscaling" row
        dec = self.cfg["transf_decoder"]["config_dict"]
        self.dd, self.dec_heads, self.dec_layers = (
            dec["hidden_size"],
            dec["num_attention_heads"],
            dec["num_layers"],
        )

    def ln(self, x, p, eps=1e-5):
        return F.layer_norm(x, x.shape[-1:], self.sd[f"{p}.weight"], self.sd[f"{p}.bias"], eps)

    def lin(self, x, p):
        return F.linear(x, self.sd[f"{p}.weight"], self.sd.get(f"{p}.bias"))

    def features(self, audio):
        """Preprocessor row: (n_samples,) -> (n_mels, n_samples // hop)."""
        n = audio.numel() // 160
        x = torch.cat([audio[:1], audio[1:] - 0.97 * audio[:-1]])
        window = F.pad(self.sd["preprocessor.featurizer.window"], (56, 56))  # 400 centred in 512
        spec = torch.stft(x, 512, 160, window=window, pad_mode="constant", return_complex=True)
        mel = self.sd["preprocessor.featurizer.fb"][0] @ spec.abs().pow(2)
        logmel = torch.log(mel + 2**-24)[:, :n]
        mean, std = logmel.mean(1, keepdim=True), logmel.std(1, keepdim=True)  # unbiased std
        return (logmel - mean) / (std + 1e-5)

    def subsample(self, feats):
        """dw_striding row: (n_mels, T) -> (T', d)."""
        p = "encoder.pre_encode"
        x = feats.T[None, None]  # (1, 1, time, freq)
        x = F.conv2d(x, self.sd[f"{p}.conv.0.weight"], self.sd[f"{p}.conv.0.bias"], 2, 1).relu()
        for dw, pw in ((2, 3), (5, 6)):
            w, b = self.sd[f"{p}.conv.{dw}.weight"], self.sd[f"{p}.conv.{dw}.bias"]
            x = F.conv2d(x, w, b, 2, 1, groups=x.shape[1])
            x = F.conv2d(x, self.sd[f"{p}.conv.{pw}.weight"], self.sd[f"{p}.conv.{pw}.bias"]).relu()
        _, c, t, f = x.shape
        return self.lin(x[0].permute(1, 0, 2).reshape(t, c * f), f"{p}.out")  # channel-major

    def rel_table(self, t):
        """Sinusoid row: (2t-1, d), row m holds relative position t-1-m, built in float32."""
        pos = torch.arange(t - 1, -t, -1, dtype=torch.float32)[:, None]
        freq = torch.exp(
            torch.arange(0, self.d, 2, dtype=torch.float32) * -(math.log(1e4) / self.d)
        )
        pe = torch.zeros(2 * t - 1, self.d)
        pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
        return pe.to(DT)

    def rel_attention(self, x, p):
        """rel_pos row: score[h,i,j] = ((q_i+u)·k_j + (q_i+v)·W_pos PE(i-j)) / sqrt(dk)."""
        t, h = x.shape[0], self.heads
        dk = self.d // h
        q, k, v = (self.lin(x, f"{p}.linear_{n}").view(t, h, dk) for n in "qkv")
        pos = F.linear(self.rel_table(t), self.sd[f"{p}.linear_pos.weight"]).view(-1, h, dk)
        ac = torch.einsum("ihd,jhd->hij", q + self.sd[f"{p}.pos_bias_u"], k)
        bd_all = torch.einsum("ihd,mhd->him", q + self.sd[f"{p}.pos_bias_v"], pos)
        i, j = torch.arange(t)[:, None], torch.arange(t)[None]
        bd = bd_all[:, i, (t - 1) - (i - j)]
        att = torch.softmax((ac + bd) / math.sqrt(dk), -1)
        return self.lin(torch.einsum("hij,jhd->ihd", att, v).reshape(t, self.d), f"{p}.linear_out")

    def conv_module(self, x, p):
        """Conv module row: pw1 -> GLU -> depthwise -> BatchNorm (running stats) -> SiLU -> pw2."""
        sd = self.sd
        y = F.conv1d(x.T[None], sd[f"{p}.pointwise_conv1.weight"], sd[f"{p}.pointwise_conv1.bias"])
        y = F.glu(y, dim=1)
        w = sd[f"{p}.depthwise_conv.weight"]
        y = F.conv1d(
            y, w, sd[f"{p}.depthwise_conv.bias"], padding=(w.shape[-1] - 1) // 2, groups=y.shape[1]
        )
        bn = f"{p}.batch_norm"
        mean, var = sd[f"{bn}.running_mean"], sd[f"{bn}.running_var"]
        y = F.batch_norm(
            y, mean, var, sd[f"{bn}.weight"], sd[f"{bn}.bias"], training=False, eps=1e-5
        )
        y = F.conv1d(F.silu(y), sd[f"{p}.pointwise_conv2.weight"], sd[f"{p}.pointwise_conv2.bias"])
        return y[0].T

    def feed_forward(self, x, p):
        return self.lin(F.silu(self.lin(x, f"{p}.linear1")), f"{p}.linear2")

    def encoder(self, feats):
        """Conformer layer row, after subsampling and xscaling: (n_mels, T) -> (T', d)."""
        x = self.subsample(feats) * self.xscale
        for n in range(self.n_layers):
            p = f"encoder.layers.{n}"
            x = x + 0.5 * self.feed_forward(
                self.ln(x, f"{p}.norm_feed_forward1"), f"{p}.feed_forward1"
            )
            x = x + self.rel_attention(self.ln(x, f"{p}.norm_self_att"), f"{p}.self_attn")
            x = x + self.conv_module(self.ln(x, f"{p}.norm_conv"), f"{p}.conv")
            x = x + 0.5 * self.feed_forward(
                self.ln(x, f"{p}.norm_feed_forward2"), f"{p}.feed_forward2"
            )
            x = self.ln(x, f"{p}.norm_out")
        return x

    def attention(self, x, memory, p, causal):
        """Decoder attention row (plain scaled dot product, separate q/k/v with bias)."""
        tq, tk, h = x.shape[0], memory.shape[0], self.dec_heads
        dh = self.dd // h
        q = self.lin(x, f"{p}.query_net").view(tq, h, dh)
        k = self.lin(memory, f"{p}.key_net").view(tk, h, dh)
        v = self.lin(memory, f"{p}.value_net").view(tk, h, dh)
        s = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(dh)
        if causal:
            s = s.masked_fill(torch.ones(tq, tk, dtype=torch.bool).triu(1), -math.inf)
        out = torch.einsum("hij,jhd->ihd", torch.softmax(s, -1), v).reshape(tq, self.dd)
        return self.lin(out, f"{p}.out_projection")

    def decoder(self, ids, memory):
        """Decoder embedding, pre-LN block, final LN and tied head rows: ids (L,) -> (L, V_pad)."""
        e = "transf_decoder._embedding"
        pos = self.sd[f"{e}.position_embedding.pos_enc"][: len(ids)]  # already divided by sqrt(d)
        x = self.ln(self.sd[f"{e}.token_embedding.weight"][ids] + pos, f"{e}.layer_norm")
        for n in range(self.dec_layers):
            p = f"transf_decoder._decoder.layers.{n}"
            y = self.ln(x, f"{p}.layer_norm_1")
            x = x + self.attention(y, y, f"{p}.first_sub_layer", causal=True)
            x = x + self.attention(
                self.ln(x, f"{p}.layer_norm_2"), memory, f"{p}.second_sub_layer", False
            )
            y = self.ln(x, f"{p}.layer_norm_3")
            ff = f"{p}.third_sub_layer"
            x = x + self.lin(self.lin(y, f"{ff}.dense_in").relu(), f"{ff}.dense_out")
        x = self.ln(x, "transf_decoder._decoder.final_layer_norm")
        return torch.log_softmax(self.lin(x, "log_softmax.mlp.layer0"), -1)

    def greedy(self, prompt, memory, max_len, eos):
        ids = prompt.tolist()
        while len(ids) < max_len:
            ids.append(int(self.decoder(torch.tensor(ids), memory)[-1].argmax()))
            if ids[-1] == eos:
                break
        return ids


def main() -> int:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/nemo")
    spec = Spec(folder / "canary_tiny.nemo")
    out = torch.load(folder / "outputs.pt", weights_only=True)
    worst = 0.0
    for u in range(len(out["durations"])):

        def ref(key, u=u):
            return out[f"utt{u}.{key}"]

        def err(mine, key, u=u):
            theirs = ref(key).to(DT)
            assert mine.shape == theirs.shape, (key, mine.shape, theirs.shape)
            return float((mine - theirs).abs().max() / theirs.abs().max())

        errors = {"features": err(spec.features(ref("audio").to(DT)), "features")}
        enc = spec.encoder(ref("features").to(DT))
        errors["encoder_output"] = err(enc, "encoder_output")
        memory = spec.lin(enc, "encoder_decoder_proj")
        errors["encoder_projected"] = err(memory, "encoder_projected")
        errors["decoder_log_probs"] = err(
            spec.decoder(ref("target_ids")[:-1], memory), "decoder_log_probs"
        )
        eos = int(ref("target_ids")[-1])
        greedy = spec.greedy(ref("prompt_ids"), memory, min(512, ref("encoder_length") + 8), eos)
        same = greedy == ref("greedy_ids").tolist()
        path = spec.decoder(ref("greedy_ids")[:-1], memory)[len(ref("prompt_ids")) - 1 :]
        errors["greedy_log_probs"] = err(path, "greedy_log_probs")
        print(
            f"utt{u}: "
            + "  ".join(f"{k} {v:.1e}" for k, v in errors.items())
            + f"  greedy_ids equal: {same}"
        )
        worst = max(worst, *errors.values(), 0.0 if same else math.inf)
    print(f"max relative error {worst:.1e}")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
