"""Restore a ``.nemo`` written by ``speedasr export-nemo`` in NeMo itself and check that NeMo
computes the fixture's outputs from it.

Run with the NeMo virtualenv's Python (README.md beside this file):

    /work/nemo-venv/bin/python tools/nemo_fixture/check_export.py EXPORTED.nemo [FIXTURE_DIR]

``EncDecMultiTaskModel.restore_from`` loads the file (its config, tokenizers and weights), and
``make_fixture.reference_outputs`` runs it exactly as it ran the original model (each utterance
alone, eval mode): features, encoder output, projected encoder output, teacher-forced decoder
log-probs, greedy ids and their log-probs, greedy text. Every output must equal the fixture's
``outputs.pt`` to within 1e-6 relative (same weights, same code: in practice bit for bit); ids and
text exactly. Prints the max error per output and exits 1 on any difference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixture import reference_outputs  # noqa: E402

SEED = 2026  # make_fixture's default: the texts and waveforms of the committed outputs.pt


def main() -> int:
    exported = Path(sys.argv[1])
    folder = Path(sys.argv[2] if len(sys.argv) > 2 else "tests/fixtures/nemo")
    import nemo
    from nemo.collections.asr.models import EncDecMultiTaskModel

    model = EncDecMultiTaskModel.restore_from(str(exported), map_location="cpu")
    model.eval()
    ours = reference_outputs(model, SEED)
    theirs = torch.load(folder / "outputs.pt", weights_only=True)
    worst, failed = {}, []
    for key, ref in theirs.items():
        if key in ("versions",):
            continue
        got = ours[key]
        name = key.split(".", 1)[-1]
        if isinstance(ref, torch.Tensor) and ref.is_floating_point():
            if got.shape != ref.shape:
                failed.append(f"{key}: shape {tuple(got.shape)} != {tuple(ref.shape)}")
                continue
            err = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            worst[name] = max(worst.get(name, 0.0), err)
        else:
            same = torch.equal(got, ref) if isinstance(ref, torch.Tensor) else got == ref
            if not same:
                failed.append(f"{key}: differs")
    print(f"nemo_toolkit {nemo.__version__}, restore_from({exported.name}):")
    print("  " + "  ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items())))
    bad = [k for k, v in worst.items() if v > 1e-6]
    for line in failed + [f"{k}: {worst[k]:.1e} > 1e-6" for k in bad]:
        print("  FAIL " + line)
    print("ids and texts equal" if not failed else f"{len(failed)} differences")
    return 1 if failed or bad else 0


if __name__ == "__main__":
    sys.exit(main())
