"""The bottom layer: what every other layer shares and nothing of ours is imported by.

``segments`` (the packed-sequence descriptor), ``batch`` (the collator's batch types) and
``geometry`` (sample rate, features, subsampling lengths, prompt length, units). A module here
imports only the standard library and torch (tests/test_layering.py keeps it so).
"""
