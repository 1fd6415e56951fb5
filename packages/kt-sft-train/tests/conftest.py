"""Tests of the training wheel: unit/, numerics/ (vs the float64 reference and plain HF + PEFT),
integration/ (PEFT, loading, adapter files), e2e/ (the CLI, examples, the e2e benchmark).

This file puts tests/ on sys.path (pytest's rootdir-less import mode), so every test imports the one
tiny-model factory as `from factory import ...`.
"""
