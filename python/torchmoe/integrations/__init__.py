"""Integrations of torchmoe with other libraries (optional dependencies, imported on demand).

- :mod:`torchmoe.integrations.transformers` — Hugging Face transformers: the ``"torchmoe"`` experts backend
  and :func:`~torchmoe.integrations.transformers.apply_torchmoe`.

Importing this package imports nothing but itself; ``import torchmoe`` never imports transformers.
"""
