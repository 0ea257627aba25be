"""Pure-PyTorch packed attention: grouped vs per-utterance vs one padded call, forward + backward.

``python -m speedasr.bench.torch_attention [--utterances 64] [--causal]`` times the three ways
``speedasr.nn.attention_torch`` could compute a long-tailed batch on the CPU (the grouping it uses,
one call per utterance, one dense padded call) and prints how much faster grouping is.
"""

from __future__ import annotations

import argparse
import math
import random
import time

import torch
from torch.nn.utils.rnn import pad_sequence

from speedasr.core.geometry import ENCODER_FRAMES_PER_SECOND
from speedasr.nn.attention_torch import (
    dense_attention_mask,
    masked_sdpa,
    per_utterance_attention,
    plan_groups,
    torch_packed_attention,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--utterances", type=int, default=64)
    parser.add_argument("--per-second", type=float, default=ENCODER_FRAMES_PER_SECOND,
                        help="sequence positions per second of audio: 12.5 encoder frames, "
                        "~4 decoder tokens")  # fmt: skip
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=36)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--causal", action="store_true")
    args = parser.parse_args(argv)
    rng = random.Random(0)
    # 1-20 s utterances, log-normal around ~4.5 s (a long tail, like real corpora)
    seconds = [min(20.0, rng.lognormvariate(1.5, 0.6)) for _ in range(args.utterances)]
    lengths = [max(1, round(args.per_second * s)) for s in seconds]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    n, h, d, m = sum(lengths), args.heads, args.head_dim, max(lengths)
    q, k, v = (torch.randn(n, h, d, requires_grad=True) for _ in range(3))
    # the padded layout is the input of the padded strategy (built outside its timing)
    qp, kp, vp = (
        pad_sequence(t.detach().split(lengths), batch_first=True).transpose(1, 2).requires_grad_()
        for t in (q, k, v)
    )
    pad_mask = dense_attention_mask(lengths, lengths, m, m, args.causal, "cpu")
    strategies = {
        "grouped (packed)": lambda: torch_packed_attention(q, k, v, cu, cu, m, m, args.causal),
        "per-utterance loop": lambda: per_utterance_attention(q, k, v, cu, cu, args.causal),
        "one padded call": lambda: masked_sdpa(qp, kp, vp, *pad_mask, 1 / math.sqrt(d)),
    }

    def timed(fn) -> float:
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn().sum().backward()
            best = min(best, time.perf_counter() - t0)
        return best

    real, padded = sum(x * x for x in lengths), len(lengths) * m * m
    print(
        f"{len(lengths)} utterances, {n} positions (max {m}), H={h} D={d}, causal={args.causal}, "
        f"{len(plan_groups(lengths, lengths))} groups; score entries: real {real}, padded "
        f"{padded}; forward+backward, best of {args.repeats}, {torch.get_num_threads()} thread(s)"
    )
    times = {name: timed(fn) for name, fn in strategies.items()}
    for name, t in times.items():
        print(f"  {name:<20} {t * 1e3:8.1f} ms")
    base = times["grouped (packed)"]
    print(
        f"  grouped is {times['per-utterance loop'] / base:.1f}x faster than the loop, "
        f"{times['one padded call'] / base:.1f}x faster than one padded call"
    )


if __name__ == "__main__":
    main()
