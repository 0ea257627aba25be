"""Lhotse-style dataset: a CutSet chosen by the sampler -> one ``PackedBatch`` (or ``PaddedBatch``).

Per cut: load audio, compute log-mel fbank on the fly (lhotse's extractor), normalize each utterance
over its own frames, SpecAugment (training only, per utterance, so nothing crosses utterances), and
tokenize ``prompt + text``. The batch descriptors (``Segments``) are built here, once per batch.

With NeMo's aggregate tokenizer (an imported Canary model) the prompt follows the cut's ``pnc``
(``cut.custom["pnc"]``, as ``speedasr data import --format nemo`` keeps it; NeMo's values), and
without one it asks for punctuation and capitals as NeMo's does. speedasr's own tokenizer always
prompts ``<|nopnc|>`` (its models learn the text as written).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
from lhotse import CutSet
from lhotse.cut import Cut
from lhotse.dataset import SpecAugment
from lhotse.features import Fbank, FbankConfig

from speedasr.core.batch import IGNORE_INDEX, PackedBatch, PaddedBatch
from speedasr.core.geometry import SAMPLE_RATE
from speedasr.core.segments import Segments
from speedasr.data.audio import AudioLoadError, load_model_audio
from speedasr.data.nemo_tokenizer import AggregateTokenizer, pnc_flag
from speedasr.data.tokenizer import Tokenizer
from speedasr.errors import UserError

log = logging.getLogger(__name__)


@dataclass
class SpecAugmentConfig:
    """SpecAugment applied per utterance during training (lhotse's implementation)."""

    enabled: bool = True
    """Turn SpecAugment on for training batches (never applied to validation/inference)."""
    num_frame_masks: int = 2
    """Time masks per utterance (scaled down for short utterances by lhotse's max fraction)."""
    frames_mask_size: int = 40
    """Maximum width of one time mask, in frames (10 ms each)."""
    max_frames_mask_fraction: float = 0.15
    """Time masks never cover more than this fraction of an utterance."""
    num_feature_masks: int = 2
    """Frequency masks per utterance."""
    features_mask_size: int = 15
    """Maximum width of one frequency mask, in mel bins."""
    time_warp_factor: int = 0
    """Time warping strength; 0 disables it (it costs more than it helps for tiny models)."""


def decoder_sequences(
    tokenizer: Tokenizer, text: str, language: str, pnc: bool | None = None
) -> tuple[list[int], list[int]]:
    """Decoder input and target ids of one utterance, ``L = prompt + text`` positions each.

    inputs:  ``<sot> <lang> <task> <pnc> t1 ... tn``
    targets: ``IGNORE ... IGNORE t1 ... tn <eot>`` (first ``prompt - 1``: no loss)

    ``pnc``: the prompt's punctuation-and-capitals token; None: the tokenizer's default.
    """
    prompt = tokenizer.prompt(language) if pnc is None else tokenizer.prompt(language, pnc=pnc)
    text_ids = tokenizer.encode(text, language)
    inputs = prompt + text_ids
    targets = [IGNORE_INDEX] * (len(prompt) - 1) + text_ids + [tokenizer.eot_id]
    return inputs, targets


def reference_and_language(cut: Cut) -> tuple[str, str]:
    """The reference text and the prompt language of ``cut``: its first supervision's.

    Cuts to transcribe may have no supervision, or one without text or language (validation with
    ``require_text=False`` lets them through): nothing to score, so the reference is ``""``, and
    the language is ``"en"``. Training and eval reject cuts without text before they get here.
    """
    supervision = cut.supervisions[0] if cut.supervisions else None
    if supervision is None:
        return "", "en"
    return supervision.text or "", supervision.language or "en"


def cut_pnc(cut: Cut) -> bool | None:
    """The cut's ``pnc`` (``cut.custom["pnc"]``, NeMo's values: yes/no, true/false, 1/0), or None
    when it has none. ``UserError`` naming the cut for a value NeMo does not accept either."""
    value = (getattr(cut, "custom", None) or {}).get("pnc")
    if value is None:
        return None
    try:
        return pnc_flag(value)
    except ValueError as e:
        raise UserError(f"cut '{cut.id}': {e}") from None


class AsrDataset(torch.utils.data.Dataset):
    """Maps a sampled ``CutSet`` to a batch. Use with a lhotse sampler and ``batch_size=None``.

    Args:
        tokenizer: gives prompt and text ids.
        n_mels: log-mel bins per frame: the ``n_mels`` of the model config the features are for
            (no default: the model, not the data pipeline, decides its input features).
        layout: ``"packed"`` (default, zero padding) or ``"padded"``.
        spec_augment: SpecAugment settings, or None for no augmentation (validation, inference).
        frontend: a module mapping 16 kHz audio ``(N,)`` to normalised ``(T, n_mels)`` features
            instead of lhotse's fbank (``AEDModel.frontend``: NeMo's front end of an imported
            Canary model); None: lhotse's Kaldi fbank with per-utterance normalisation.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        n_mels: int,
        layout: Literal["packed", "padded"] = "packed",
        spec_augment: SpecAugmentConfig | None = None,
        frontend: torch.nn.Module | None = None,
    ) -> None:
        if layout not in ("packed", "padded"):
            raise ValueError(f"layout must be 'packed' or 'padded', got {layout!r}")
        self.tokenizer = tokenizer
        # NeMo's Canary prompts carry the manifest's pnc; speedasr's own prompt is fixed.
        self.prompt_follows_pnc = isinstance(tokenizer, AggregateTokenizer)
        self.layout = layout
        self.n_mels = n_mels
        self.extractor = Fbank(FbankConfig(num_mel_bins=n_mels))
        self.frontend = frontend
        self.spec_augment = None
        if spec_augment is not None and spec_augment.enabled:
            self.spec_augment = SpecAugment(
                time_warp_factor=spec_augment.time_warp_factor or None,
                num_feature_masks=spec_augment.num_feature_masks,
                features_mask_size=spec_augment.features_mask_size,
                num_frame_masks=spec_augment.num_frame_masks,
                frames_mask_size=spec_augment.frames_mask_size,
                max_frames_mask_fraction=spec_augment.max_frames_mask_fraction,
                p=1.0,
            )

    def __getitem__(self, cuts: CutSet) -> PackedBatch | PaddedBatch:
        feats, tokens, targets, prompts, kept, skipped = [], [], [], [], [], []
        for cut in cuts:
            try:
                x = self.features(cut)
            except Exception as e:  # a broken file must not kill a long training run
                failure = e if isinstance(e, AudioLoadError) else AudioLoadError.from_exception(e)
                log.warning("skipping cut %s: %s (%s)", cut.id, failure.reason, failure.detail)
                skipped.append((cut.id, failure.reason, failure.detail))
                continue
            text, language = reference_and_language(cut)
            pnc = cut_pnc(cut) if self.prompt_follows_pnc else None
            inp, tgt = decoder_sequences(self.tokenizer, text, language, pnc)
            feats.append(x)
            tokens.append(torch.tensor(inp, dtype=torch.int64))
            targets.append(torch.tensor(tgt, dtype=torch.int64))
            prompts.append(tgt.count(IGNORE_INDEX) + 1)  # the last prompt position predicts t1
            kept.append(cut)
        feature_segments = Segments.from_lengths([x.shape[0] for x in feats])
        token_segments = Segments.from_lengths([t.shape[0] for t in tokens])
        batch = PackedBatch(
            features=torch.cat(feats) if feats else torch.zeros(0, self.n_mels),
            feature_segments=feature_segments,
            tokens=torch.cat(tokens) if tokens else torch.zeros(0, dtype=torch.int64),
            targets=torch.cat(targets) if targets else torch.zeros(0, dtype=torch.int64),
            token_segments=token_segments,
            prompt_lengths=tuple(prompts),
            cut_ids=[c.id for c in kept],
            durations=tuple(c.duration for c in kept),
            texts=[reference_and_language(c)[0] for c in kept],
            skipped_cut_ids=tuple(cut_id for cut_id, _, _ in skipped),
            skipped_reasons=tuple((reason, detail) for _, reason, detail in skipped),
        )
        if self.layout == "padded":
            return batch.to_padded(self.tokenizer.pad_id)
        return batch

    def features(self, cut: Cut) -> torch.Tensor:
        """``(T, n_mels)`` normalized (and, in training, augmented) log-mel frames of one cut."""
        audio = load_model_audio(cut)
        if self.frontend is not None:
            with torch.no_grad():
                x = self.frontend(torch.from_numpy(audio).reshape(-1))
        else:
            x = torch.from_numpy(self.extractor.extract(audio, SAMPLE_RATE))
            # Per-utterance mean/variance normalization: statistics over this utterance only.
            x = (x - x.mean(0)) / (x.std(0, unbiased=False) + 1e-5)
        if self.spec_augment is not None:
            x = self.spec_augment(x[None])[0]
        return x
