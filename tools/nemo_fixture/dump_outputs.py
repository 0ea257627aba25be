"""Restore a ``.nemo`` in NeMo and save NeMo's outputs on the fixture's audio (for a model whose
outputs are not the fixture's, e.g. one fine-tuned by speedasr and exported with export-nemo).

    /work/nemo-venv/bin/python tools/nemo_fixture/dump_outputs.py MODEL.nemo OUT.pt

``OUT.pt`` holds ``make_fixture.reference_outputs`` (the keys of the fixture's ``outputs.pt``)
and ``config.encoder.dropout``, the dropout NeMo's restored config states.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixture import reference_outputs  # noqa: E402

SEED = 2026  # make_fixture's default: the fixture's texts and waveforms


def main() -> int:
    from nemo.collections.asr.models import EncDecMultiTaskModel

    model = EncDecMultiTaskModel.restore_from(sys.argv[1], map_location="cpu")
    model.eval()
    outputs = reference_outputs(model, SEED)
    outputs["config.encoder.dropout"] = float(model.cfg.encoder.dropout)
    torch.save(outputs, sys.argv[2])
    print(f"saved NeMo's outputs of {sys.argv[1]} to {sys.argv[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
