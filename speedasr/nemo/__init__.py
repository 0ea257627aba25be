"""NeMo Canary checkpoints (``.nemo``) in speedasr: ``import_nemo`` (docs/canary.md,
"Importing")."""
