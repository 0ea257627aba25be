"""The documented path of ``synthesize_corpus`` before the embedded corpus moved to offline
preparation (``speedasr.prep.corpus``); kept for callers of that path until speedasr 0.2."""

from speedasr.prep.corpus import synthesize_corpus

__all__ = ["synthesize_corpus"]
