"""speedasr: padding-free training of attention encoder-decoder speech recognition models."""

__version__ = "0.1.0"
