"""LightningDataModule: validated cutsets -> sampler (packed by default) -> batches."""

from __future__ import annotations

import atexit
import copy
import gc
import logging
import signal
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from lhotse import CutSet
from lhotse.dataset import DynamicCutSampler

from speedasr.core.batch import PackedBatch, PaddedBatch
from speedasr.data.audio import AudioLoadError
from speedasr.data.dataset import AsrDataset, SpecAugmentConfig
from speedasr.data.manifests import ValidationReport, load_cuts, validate_cuts
from speedasr.data.nemo_tokenizer import AggregateTokenizer
from speedasr.data.sampling import SamplerConfig, build_sampler
from speedasr.data.tokenizer import Tokenizer
from speedasr.errors import UserError
from speedasr.train.resume import ResumableSampler, SeededBatches, sampler_fingerprint

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    """Where the data comes from and how it is turned into batches."""

    train_cuts: str = ""
    """Training cutset: lhotse ``.jsonl.gz``, or a Shar directory (``speedasr data export-shar``;
    streamed, see ``speedasr.data.shar``)."""
    dev_cuts: str | None = None
    """Validation cutset; validation loss and WER are logged when set."""
    tokenizer: str = ""
    """Tokenizer directory (``speedasr tokenizer train``)."""
    layout: Literal["packed", "padded"] = "packed"
    """Batch layout handed to the model: packed (zero padding) or padded (for comparison)."""
    max_duration: float = 30.0
    """Cuts longer than this (seconds) are rejected at validation time, counted in the report."""
    check_audio: Literal["header", "full", "none"] = "header"
    """Audio checks before training: file headers only (fast), full decode, or none."""
    num_workers: int = 1
    """DataLoader worker processes (feature extraction runs there)."""
    val_batch_duration: float = 300.0
    """Seconds of audio per validation batch."""
    val_max_utterances: int | None = None
    """Use only the first N validation cuts (None: all)."""
    spec_augment: SpecAugmentConfig = field(default_factory=SpecAugmentConfig)
    """SpecAugment for training batches."""
    allow_command_sources: bool = False
    """Accept cuts whose audio lhotse loads by running a shell command (``command`` sources,
    ``pipe:`` URLs). Off: such cuts are rejected (reason command_source) and never run. Turn on
    only for manifests you wrote yourself."""


class AsrDataModule(pl.LightningDataModule):
    """Builds train/validation dataloaders from ``DataConfig`` + ``SamplerConfig``.

    Exact resume: the checkpoint holds ``(epoch, batches consumed in the epoch)``, taken when a
    training step starts (``speedasr.train.resume.TrainingProgress`` calls ``batch_started``)
    from the position the sampler gave that batch, not from the sampler's own position, which
    runs ahead of training by the batches the DataLoader prefetched. On resume a fresh sampler of
    the same seed replays that epoch and skips that many batches (metadata only, no audio is
    read), or starts the next epoch if none is left, so training continues with exactly the
    batches that would have come next. Each batch also carries a seed derived from
    ``(seed, epoch, index, rank)`` for its augmentation, so the features of a batch do not depend
    on which worker made them.
    """

    def __init__(
        self, data: DataConfig, sampler: SamplerConfig, *, n_mels: int, seed: int = 0,
        report_dir: str | None = None, tokenizer: Tokenizer | AggregateTokenizer | None = None,
        frontend: torch.nn.Module | None = None,
    ) -> None:  # fmt: skip
        """``tokenizer``: the model's (a checkpoint's, for ``init_from``) instead of loading
        ``data.tokenizer``; ``frontend``: the model's feature module (NeMo's front end, see
        ``AsrDataset``) instead of lhotse's fbank: training runs a copy in training mode (NeMo's
        dither), validation one in eval mode."""
        super().__init__()
        self.cfg = data
        self.n_mels = n_mels  # the trained model's input features (ModelConfig.n_mels)
        self.sampler_cfg = sampler
        self.seed = seed
        self.report_dir = Path(report_dir) if report_dir else None
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer.load(data.tokenizer)
        self.frontend = frontend
        self.train_cuts: CutSet | None = None
        self.dev_cuts: CutSet | None = None
        self.reports: dict[str, ValidationReport] = {}
        self._train_sampler: ResumableSampler | None = None
        self.progress = {"epoch": -1, "batches": 0}  # training batches consumed, current epoch
        self._resume_state: dict[str, Any] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_cuts is None and stage in (None, "fit"):
            self.train_cuts = self._load("train", self.cfg.train_cuts)
        if self.dev_cuts is None and self.cfg.dev_cuts:
            cuts = self._load("dev", self.cfg.dev_cuts)
            if self.cfg.val_max_utterances:
                cuts = cuts.subset(first=min(self.cfg.val_max_utterances, len(cuts)))
            self.dev_cuts = cuts

    def _load(self, name: str, path: str) -> CutSet:
        """Validated cuts of a ``.jsonl.gz`` manifest (eager) or a Shar directory (lazy)."""
        from speedasr.data.shar import is_shar_dir, load_validated_shar

        check_audio = self.cfg.check_audio
        if name == "dev" and check_audio == "header":
            # Dev sets are small: load every cut now, so that one that cannot be loaded is a
            # reported reject, not a cut silently missing from val/wer (or, if none loads, no
            # val/wer at all for checkpointing to monitor).
            check_audio = "full"
        checks = dict(
            max_duration=self.cfg.max_duration,
            check_audio=check_audio,
            allow_command_sources=self.cfg.allow_command_sources,
        )
        shar = is_shar_dir(path)
        if shar:
            accepted, report = load_validated_shar(path, **checks)
        else:
            accepted, report = validate_cuts(load_cuts(path), **checks)
        self.reports[name] = report
        where = ""
        if self.report_dir is not None:
            self.report_dir.mkdir(parents=True, exist_ok=True)
            report.write(self.report_dir / f"rejects_{name}.jsonl")
            where = f" Rejects: {self.report_dir / f'rejects_{name}.jsonl'}"
        log.info("%s cuts: %s", name, report.summary())
        if not report.accepted:
            raise UserError(f"no usable {name} cuts in '{path}': {report.summary()}{where}")
        return accepted if shar else accepted.to_eager()

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        trainer = self.trainer
        world_size = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        sampler = build_sampler(
            self.train_cuts, self.sampler_cfg, self.tokenizer,
            world_size=world_size, rank=rank, seed=self.seed,
        )  # fmt: skip
        self._train_sampler = ResumableSampler(sampler, seed=self.seed, rank=rank)
        if self._resume_state is not None:
            self._check_resume(self._resume_state, world_size)
            self._train_sampler.resume(self.progress["epoch"], self.progress["batches"])
            self._resume_state = None
        dataset = self.dataset(spec_augment=self.cfg.spec_augment)
        return self._loader(SeededBatches(dataset), self._train_sampler, persistent=True)

    def val_dataloader(self) -> torch.utils.data.DataLoader | list:
        if self.dev_cuts is None:
            return []
        with warnings.catch_warnings():  # the dev set is small and read eagerly on purpose
            warnings.filterwarnings("ignore", message=".*eagerly read CutSet.*")
            sampler = DynamicCutSampler(self.dev_cuts, max_duration=self.cfg.val_batch_duration)
        return self._loader(self.dataset(), sampler)

    def dataset(self, spec_augment: SpecAugmentConfig | None = None) -> AsrDataset:
        """Cuts -> batches in this run's layout, with the model's ``n_mels`` log-mel bins
        (training: with ``spec_augment``; validation: without)."""
        frontend = None
        if self.frontend is not None:
            frontend = copy.deepcopy(self.frontend).to("cpu", torch.float32)
            frontend.train(spec_augment is not None)
        return AsrDataset(
            self.tokenizer, n_mels=self.n_mels, layout=self.cfg.layout, spec_augment=spec_augment,
            frontend=frontend,
        )  # fmt: skip

    def _loader(self, dataset, sampler, persistent: bool = False) -> torch.utils.data.DataLoader:
        workers = self.cfg.num_workers
        if workers > 0:
            # Workers are forked from this process. Every page they write to — Python's garbage
            # collector touching inherited objects (the whole cutset), malloc reusing free chunks
            # of the inherited heap — becomes a private copy. So training workers are forked once,
            # while this process is still small, and kept (persistent: re-forking each epoch from
            # a grown training process made host memory climb epoch after epoch), and objects
            # alive now are frozen out of the collector's reach.
            gc.collect()
            gc.freeze()
            # ...until this process exits: frozen objects escape the final collection, and
            # extension modules that check for leaks at exit (triton's nanobind bindings, which
            # torch._dynamo imports with Lightning) would print ~30 lines of "leaked instances".
            # Forked workers leave through os._exit and keep their objects frozen.
            _unfreeze_at_exit()
        # A private generator: otherwise every ``iter(loader)`` draws its worker base seed from
        # torch's global generator, which would shift dropout after a resume.
        return torch.utils.data.DataLoader(
            dataset,
            sampler=sampler,
            batch_size=None,
            num_workers=self.cfg.num_workers,
            persistent_workers=persistent and workers > 0,
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=_ignore_stop_signals,
        )

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        if isinstance(batch, (PackedBatch, PaddedBatch)):
            return batch.to(device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def explain_skipped(self, cut_ids: list[str]) -> ValidationReport:
        """Reasons why these training cuts failed to load mid-training (loads each again once:
        the dataset, in a worker process, only reports which cuts it left out)."""
        report = ValidationReport(check_audio="during training")
        wanted = set(cut_ids)
        cuts = {c.id: c for c in (self.train_cuts or []) if c.id in wanted}
        dataset = self.dataset()
        for cut_id in cut_ids:
            report.total += 1
            cut = cuts.get(cut_id)
            if cut is None:
                report.add_reject(cut_id, "corrupt_audio", "failed to load (cut not found again)")
                continue
            try:
                dataset.features(cut)
            except Exception as e:
                failure = e if isinstance(e, AudioLoadError) else AudioLoadError.from_exception(e)
                report.add_reject(cut_id, failure.reason, failure.detail)
            else:  # a transient failure (e.g. network storage): loads fine now
                report.add_reject(cut_id, "corrupt_audio", "failed to load during training only")
        return report

    # --- exact resume ---------------------------------------------------------------------------
    def batch_started(self, epoch: int) -> int:
        """A training step of the trainer's ``epoch`` starts on the next batch; returns that
        batch's index in the epoch, as the sampler labelled it.

        Raises:
            RuntimeError: the batch belongs to another epoch than the trainer's (the resumed data
                position and the trainer's loop disagree: resume would not be exact).
        """
        assert self._train_sampler is not None, "batch_started before train_dataloader"
        batch_epoch, index = self._train_sampler.next_position()
        if batch_epoch != epoch:
            raise RuntimeError(
                f"training epoch {epoch} received batch {index} of epoch {batch_epoch}: the data "
                "position and the trainer's loop disagree, resume would not be exact"
            )
        self.progress = {"epoch": epoch, "batches": index + 1}
        return index

    def state_dict(self) -> dict[str, Any]:
        """Saved by Lightning in every checkpoint (plain values: loads with weights_only)."""
        trainer = self.trainer
        progress = dict(self.progress)
        if trainer is not None and trainer.current_epoch > progress["epoch"]:
            # Lightning closes an epoch that max_steps, max_time or should_stop ended early, and a
            # run resumed from this checkpoint starts the next one: so does its data. (Also: no
            # batch yet, epoch -1.)
            progress = {"epoch": trainer.current_epoch, "batches": 0}
        return {
            "progress": progress,
            "seed": self.seed,
            "world_size": trainer.world_size if trainer is not None else 1,
            "sampler": sampler_fingerprint(self.sampler_cfg),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "progress" not in state:
            raise UserError(
                "the checkpoint's data state is not from this version of speedasr "
                f"(keys {sorted(state)}); it cannot resume the data exactly"
            )
        self.progress = dict(state["progress"])
        self._resume_state = state

    def _check_resume(self, state: dict[str, Any], world_size: int) -> None:
        """Resuming mid-epoch replays the epoch's batches: anything that changes them is an
        error, named, rather than a silently different run."""
        problems = []
        if state["seed"] != self.seed:
            problems.append(f"seed {state['seed']} -> {self.seed}")
        if state["world_size"] != world_size:
            problems.append(f"world size {state['world_size']} -> {world_size}")
        now = sampler_fingerprint(self.sampler_cfg)
        changed = sorted(
            k for k in set(now) | set(state["sampler"]) if now.get(k) != state["sampler"].get(k)
        )
        problems += [f"sampler.{k} {state['sampler'].get(k)!r} -> {now.get(k)!r}" for k in changed]
        if problems and self.progress["batches"] > 0:
            raise UserError(
                "cannot resume mid-epoch: the checkpoint was made with different data settings ("
                + "; ".join(problems)
                + "). Restore them, or resume from a checkpoint saved at the end of an epoch."
            )


def _ignore_stop_signals(worker_id: int) -> None:
    """In a DataLoader worker: ignore Ctrl-C and SIGTERM. Both reach every process of the group
    (a terminal's Ctrl-C, ``timeout``, job schedulers); the main process stops training after the
    current step (``speedasr.train.faults.GracefulStop``) and then shuts its workers down, while a
    worker that died first would turn that clean stop into a crash. Workers still exit on their
    own when the main process is gone (torch checks)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


_UNFREEZE_REGISTERED = False


def _unfreeze_at_exit() -> None:
    """Register ``gc.unfreeze`` to run at exit once per process (every loader freezes anew)."""
    global _UNFREEZE_REGISTERED
    if not _UNFREEZE_REGISTERED:
        atexit.register(gc.unfreeze)
        _UNFREEZE_REGISTERED = True
