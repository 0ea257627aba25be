"""speedasr: padding-free training of attention encoder-decoder speech recognition models.

Python API (docs/api.md)::

    import speedasr
    model = speedasr.load("exp/checkpoints/last.ckpt")
    texts = model.transcribe(["a.wav", "b.flac"], beam_size=4)

``import speedasr`` stays cheap: torch, lhotse and the model are imported by ``load``.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not `typing.TYPE_CHECKING`: importing typing costs more than the rest
if TYPE_CHECKING:
    from speedasr.api import Transcriber

__version__ = "0.1.0"
__all__ = ["Transcriber", "__version__", "load"]


def load(ckpt, device="cpu", dtype="float32", attention_backend=None) -> Transcriber:
    """The model of a speedasr checkpoint, ready to ``transcribe``; see ``speedasr.api.load``."""
    from speedasr.api import load as _load

    return _load(ckpt, device=device, dtype=dtype, attention_backend=attention_backend)


def __getattr__(name: str):
    if name == "Transcriber":  # the class, without importing torch at `import speedasr`
        from speedasr.api import Transcriber

        return Transcriber
    raise AttributeError(f"module 'speedasr' has no attribute '{name}'")
