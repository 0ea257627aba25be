"""Offline data preparation, apart from batching: the embedded speech corpus (``corpus``, spoken by
eSpeak NG through ``espeak`` from ``sentences``), manifest importers (``importers``), Shar export
(``shar_export``) and tokenizer training (``tokenizer_cli``). Its output is lhotse manifests (and a
tokenizer) that ``speedasr.data`` reads; nothing in ``speedasr.data`` imports it.
"""
