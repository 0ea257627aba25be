"""FrameBatchNorm across 2 data-parallel ranks (gloo, CPU) equals one process on both batches.

Two processes are spawned once for the file; each rank writes what it computed, and the parent
compares it with ``torch.nn.BatchNorm1d`` (float64) run once over the concatenation of both
ranks' frames.
"""

import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from speedasr.core.segments import Segments
from speedasr.nn.batchnorm import FrameBatchNorm
from speedasr.nn.layout import PackedLayout, PaddedLayout

C = 5
# Utterance lengths (real frames) per step and rank: rank 1 has no real frame in step 1 and one
# in step 2; step 3 has one in all (torch's BatchNorm1d refuses it; here no update and the bias
# out), step 4 none (no update, no NaN).
STEPS = [
    ([3, 5, 0, 4], [7, 2]),
    ([6, 1], [0, 0]),
    ([2, 2], [1]),
    ([0, 1], []),
    ([0], [0, 0]),
]
CASES = [("packed", 0.1), ("padded", None)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tokenizer directory and three batches: rank 0's (3 utterances), rank 1's (2 others),
    and the 5 together."""
    from lhotse import CutSet

    from speedasr.data.dataset import AsrDataset
    from speedasr.data.tokenizer import Tokenizer
    from speedasr.testing import make_tiny_cuts, tiny_texts

    root = tmp_path_factory.mktemp("data")
    tok = Tokenizer.train(tiny_texts(200, seed=1), root / "tok", vocab_size=96)
    cuts = list(make_tiny_cuts(root / "cuts", n=5, seed=0, durations=(0.5, 1.0)))
    dataset = AsrDataset(tok, n_mels=80)
    batches = [dataset[CutSet.from_cuts(c)] for c in (cuts[:3], cuts[3:], cuts)]
    return str(root / "tok"), batches


@pytest.fixture(scope="module")
def ranks(tmp_path_factory, prepared) -> list[dict]:
    """What each rank computed; one spawn (seconds of imports) serves every test here."""
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(_free_port(), str(out), *prepared), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def _worker(rank: int, port: int, out: str, tok_dir: str, batches) -> None:
    torch.set_num_threads(1)
    # every collective checked for the same op, shape and dtype on both ranks
    os.environ["TORCH_DISTRIBUTED_DEBUG"] = "DETAIL"
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=timedelta(seconds=60),  # a collective one rank skips fails instead of hanging
    )  # fmt: skip
    results = {
        "norm": _norm_steps(rank), "offset": _offset_step(rank),
        "empty_batch": _empty_batch_step(rank, tok_dir, batches),
    }  # fmt: skip
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def _norm(momentum) -> FrameBatchNorm:
    torch.manual_seed(0)
    bn = FrameBatchNorm(C, momentum=momentum).double()
    with torch.no_grad():
        bn.weight.normal_()
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return bn


def _frames(lengths, step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames ``(Σ lengths, C)`` (mean 1, std 3) and the loss weights on them, float64."""
    g = torch.Generator().manual_seed(100 * step + rank)
    n = sum(lengths)
    x = torch.randn(n, C, generator=g, dtype=torch.float64) * 3 + 1
    return x.requires_grad_(), torch.randn(n, C, generator=g, dtype=torch.float64)


def _norm_steps(rank: int) -> dict:
    results = {}
    for layout, momentum in CASES:
        bn = _norm(momentum)
        bn.train()
        steps = []
        for step, lengths in enumerate(STEPS):
            seg = Segments.from_lengths(lengths[rank])
            x, w = _frames(lengths[rank], step, rank)
            if layout == "packed":
                y = bn(x, PackedLayout(seg))
            else:  # junk in the padding must not enter the statistics
                y = seg.unpad(bn(seg.pad(x, value=1e3), PaddedLayout(seg)))
            bn.zero_grad()
            (y * w).sum().backward()
            steps.append(
                {"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad, "db": bn.bias.grad}
                | {k: v.clone() for k, v in bn.state_dict().items()}
            )
        results[layout, momentum] = steps
    return results


def _reference(momentum) -> list[dict]:
    """One process, torch's BatchNorm1d on the concatenation of both ranks' frames per step."""
    torch_bn = nn.BatchNorm1d(C, momentum=momentum).double()
    torch_bn.load_state_dict(_norm(momentum).state_dict())
    torch_bn.train()
    steps = []
    for step, lengths in enumerate(STEPS):
        pieces = [_frames(lengths[r], step, r) for r in (0, 1)]
        x = torch.cat([p[0].detach() for p in pieces]).requires_grad_()
        w = torch.cat([p[1] for p in pieces])
        torch_bn.zero_grad()
        if x.shape[0] > 1:
            y = torch_bn(x)
            (y * w).sum().backward()
            dw, db = torch_bn.weight.grad, torch_bn.bias.grad
        else:  # no variance: x̂ = 0, so y = bias and only the bias has a gradient; no update
            y, x.grad = torch_bn.bias.detach().expand_as(x), torch.zeros_like(x)
            dw, db = torch.zeros(C, dtype=torch.float64), w.sum(0)
        n0 = sum(lengths[0])
        steps.append(
            {"y": (y[:n0], y[n0:]), "dx": (x.grad[:n0], x.grad[n0:]), "dw": dw, "db": db}
            | {k: v.clone() for k, v in torch_bn.state_dict().items()}
        )
    return steps


def test_two_ranks_equal_one_process_on_the_concatenated_batch(ranks):
    close = {"rtol": 1e-10, "atol": 1e-10}
    for case in CASES:
        want = _reference(case[1])
        for step, ref in enumerate(want):
            got = [ranks[r]["norm"][case][step] for r in (0, 1)]
            for r in (0, 1):
                where = f"{case} step {step} rank {r}"
                torch.testing.assert_close(got[r]["y"], ref["y"][r], **close, msg=where)
                torch.testing.assert_close(got[r]["dx"], ref["dx"][r], **close, msg=where)
                for name in ("running_mean", "running_var", "num_batches_tracked"):
                    torch.testing.assert_close(got[r][name], ref[name], **close, msg=where)
                assert all(
                    torch.isfinite(v).all() for v in got[r].values() if v.is_floating_point()
                )
            # each rank holds its share of the weight and bias gradients; DDP sums them
            for name in ("dw", "db"):
                torch.testing.assert_close(got[0][name] + got[1][name], ref[name], **close)


def _offset_frames(rank: int) -> torch.Tensor:
    """float32 frames of mean 1000 and std 1: Σx² − N·mean² would cancel 6 digits away."""
    g = torch.Generator().manual_seed(50 + rank)
    return torch.randn(300 + 200 * rank, C, generator=g) + 1000.0


def _offset_step(rank: int) -> torch.Tensor:
    bn = FrameBatchNorm(C).train()
    x = _offset_frames(rank)
    return bn(x, PackedLayout(Segments.from_lengths([x.shape[0]]))).detach()


def test_float32_frames_far_from_zero_keep_their_variance(ranks):
    x = torch.cat([_offset_frames(r) for r in (0, 1)]).double()
    want = nn.BatchNorm1d(C).double().train()(x).detach()
    got = torch.cat([r["offset"] for r in ranks]).double()
    # float32's own rounding of x - mean (ulp of 1000: 6e-5); a float32 Σx² - N·mean² misses
    # the variance by percents
    torch.testing.assert_close(got, want, rtol=0, atol=5e-4)


# --- a rank whose batch is empty (every cut failed to load) -------------------------------------


def _model(tok_dir: str):
    """A tiny AED model with BatchNorm in 2 conformer blocks, float32, training mode."""
    from speedasr.data.tokenizer import Tokenizer
    from speedasr.models.aed import AEDModel, ModelConfig

    tok = Tokenizer.load(tok_dir)
    config = ModelConfig(
        vocab_size=tok.vocab_size, pad_id=tok.pad_id, d_model=16, encoder_layers=2,
        encoder_heads=2, decoder_layers=1, subsampling_channels=4, dropout=0.0,
        attention_backend="torch", conv_norm="batch", tie_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(3)
    return AEDModel(config).train()


class _Step(nn.Module):
    """What Lightning wraps in DDP: ``AsrModule.training_step``, whose empty-batch branch this
    repeats (importing Lightning in each process would cost seconds)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch):
        from speedasr.nn.batchnorm import take_part_without_frames

        if batch is None:
            zero = sum(p.sum() for p in self.parameters()) * 0.0
            return zero + take_part_without_frames(self.model)
        return self.model(batch).loss


def _empty_batch_step(rank: int, tok_dir: str, batches) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = _model(tok_dir)
    # Small gradient buckets: from the second step on, DDP all-reduces each as soon as it is
    # ready, in the middle of the backward, so on one group a rank without frames would pair
    # BatchNorm's sums with another rank's gradient bucket. Buffers not broadcast: each rank's
    # own running statistics are checked.
    step = DistributedDataParallel(_Step(model), bucket_cap_mb=0.002, broadcast_buffers=False)
    step(batches[rank]).backward()  # both ranks have a batch
    model.zero_grad()
    step(batches[0] if rank == 0 else None).backward()  # rank 1's batch is empty
    grads = {n: p.grad for n, p in model.named_parameters()}
    return {"grads": grads, "state": model.state_dict()}


def test_a_rank_with_an_empty_batch_joins_every_collective_in_order(ranks, prepared):
    # one process: both ranks' batches as one, then rank 0's alone (rank 1 added no frame)
    model = _model(prepared[0])
    with torch.no_grad():
        model(prepared[1][2])
    model(prepared[1][0]).loss.backward()
    ranks = [r["empty_batch"] for r in ranks]
    close = {"rtol": 1e-5, "atol": 1e-7}
    for name, p in model.named_parameters():
        for r in (0, 1):  # DDP averages rank 0's gradients with rank 1's zeros
            torch.testing.assert_close(ranks[r]["grads"][name], p.grad / 2, **close, msg=name)
    state = model.state_dict()
    stats = [k for k in state if "running" in k or "num_batches" in k]
    assert len(stats) == 6  # 2 blocks' BatchNorm, updated twice
    for k in stats:
        for r in (0, 1):
            torch.testing.assert_close(ranks[r]["state"][k], state[k], **close, msg=k)
