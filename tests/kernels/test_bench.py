"""`speedasr bench kernels`: FLOP counts, length sources, padded layout, the whole table on CPU.

The timings need a GPU; everything else (same inputs for every backend, the padded SDPA masks, the
output cross-check, the JSON) runs here with the Triton interpreter and a stand-in ``do_bench``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time

import pytest
import torch

pytest.importorskip("triton")

from speedasr.kernels import bench  # noqa: E402
from speedasr.kernels.reference import attention_ref  # noqa: E402

UserError = bench.UserError  # speedasr.errors.UserError, as the CLI prints it


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("len_q,len_k", [(5, 5), (7, 3), (3, 7), (4, 0), (0, 4)])
def test_visible_pairs_counts_the_bottom_right_causal_mask(len_q, len_k):
    rows = torch.arange(len_q)[:, None]
    cols = torch.arange(len_k)[None, :]
    assert bench.visible_pairs(len_q, len_k, True) == int((cols <= rows + len_k - len_q).sum())
    assert bench.visible_pairs(len_q, len_k, False) == len_q * len_k


def test_attention_flops():
    fwd = bench.attention_flops([2, 3], [4, 1], heads=2, head_dim=8, causal=False, mode="fwd")
    assert fwd == 4 * 2 * 8 * (2 * 4 + 3 * 1)
    assert bench.attention_flops([2, 3], [4, 1], 2, 8, False, "fwd_bwd") == 3.5 * fwd


def test_length_sources(tmp_path):
    lengths = bench.synthetic_lengths(5000, 700, seed=1)
    assert sum(lengths) == 5000 and 1 <= min(lengths) and max(lengths) <= 700
    assert lengths == bench.synthetic_lengths(5000, 700, seed=1)

    (tmp_path / "lengths.txt").write_text("3\n17\n\n200\n")
    assert bench.read_lengths(str(tmp_path / "lengths.txt"), 12.5) == [3, 17, 200]
    tsv = tmp_path / "corpus.tsv.gz"
    with gzip.open(tsv, "wt") as f:
        f.write('utt_id\tduration_seconds\ttext\na\t1.0\tsay "hi"\nb\t2.01\tok\n')
    assert bench.read_lengths(str(tsv), 12.5) == [13, 26]
    with pytest.raises(UserError, match="cannot read"):
        bench.read_lengths(str(tmp_path / "missing.txt"), 12.5)

    batch = bench.sample_batch(list(range(1, 101)), tokens=300, seed=0)
    assert sum(batch) <= 300 and len(set(batch)) == len(batch)


@pytest.mark.parametrize("causal", [False, True])
def test_padded_sdpa_matches_reference_on_real_rows(causal):
    lengths_q, lengths_k = [3, 9, 1], [5, 2, 4]
    q, k, v = (torch.randn(sum(n), 2, 8) for n in (lengths_q, lengths_k, lengths_k))
    mask = bench.padded_mask(lengths_q, lengths_k, causal, "cpu")
    out = torch.nn.functional.scaled_dot_product_attention(
        bench.pad(q, lengths_q), bench.pad(k, lengths_k), bench.pad(v, lengths_k), attn_mask=mask
    )
    out = bench.unpad(out, lengths_q)
    ref = attention_ref(
        q, k, v, *(bench._offsets(n, "cpu") for n in (lengths_q, lengths_k)), causal
    )
    rows = bench.rows_with_keys(lengths_q, lengths_k, causal)
    assert rows.sum() == (sum(lengths_q) - (7 if causal else 0))
    assert torch.allclose(out[rows], ref[rows], atol=1e-6)


def test_benchmark_table_on_cpu(monkeypatch, tmp_path):
    import triton.testing

    calls = []

    def fake_do_bench(fn, warmup, rep, grad_to_none, return_mode):
        fn()
        calls.append([t.grad is not None for t in grad_to_none])
        return 2.0

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    out = tmp_path / "k.json"
    args = _args(
        "--lengths", "3,70,1", "--kv-lengths", "5,9,64", "--heads", "2", "--head-dim", "64",
        "--dtype", "fp32", "--backends", "triton", "flash_attn", "sdpa_padded", "--json", str(out),
    )  # fmt: skip
    rows = bench.benchmark(args, torch.device("cpu"))
    assert len(rows) == 2 * 2 * 2  # flash_attn is not installed here: skipped, not failed
    assert all(row["max_abs_diff"] < 1e-5 for row in rows)
    fwd_then_bwd = [[False] * 3] * 2 + [[True] * 3] * 2  # fwd_bwd reps really ran the backward
    assert calls == fwd_then_bwd * 2
    fwd = next(r for r in rows if r["mode"] == "fwd" and r["mask"] == "full")
    flops = bench.attention_flops([3, 70, 1], [5, 9, 64], 2, 64, False, "fwd")
    assert fwd["tflops"] == pytest.approx(flops / 2e-3 / 1e12)
    assert json.loads(out.read_text())["lengths_k"] == [5, 9, 64]


def test_cli_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with pytest.raises(UserError, match="CUDA"):
        bench.run(_args())


def test_backends_that_cannot_run_here_say_why():
    cpu = torch.device("cpu")
    assert bench.unavailable("torch_varlen", cpu) == "needs CUDA"
    assert bench.unavailable("flash_attn", cpu) == "needs CUDA"
    assert bench.unavailable("triton", cpu) is None  # the interpreter runs it
    assert bench.unavailable("sdpa_padded", cpu) is None


def test_wall_clock_timer_resets_gradients_and_skips_the_warm_up():
    leaf = torch.ones(2, requires_grad=True)
    calls = []

    def step():
        calls.append(leaf.grad)  # None at every call: gradients reset before each
        time.sleep(0.05 if not calls[1:] else 0.0)  # only the warm-up call is slow
        (2 * leaf).sum().backward()

    ms = bench.wall_clock_timer(reps=3)(step, [leaf])
    assert calls == [None] * 4
    assert ms < 25  # the median of the 3 timed calls, without the 50 ms warm-up
