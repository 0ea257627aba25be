"""The grouped-attention benchmark runs and prints its comparison."""

from speedasr.bench.torch_attention import main


def test_benchmark_prints_the_three_strategies(capsys):
    main(["--utterances", "6", "--repeats", "1", "--heads", "1", "--head-dim", "8", "--causal"])
    out = capsys.readouterr().out
    for name in ("grouped (packed)", "per-utterance loop", "one padded call", "faster than"):
        assert name in out
