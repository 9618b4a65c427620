"""The torchmoe demo: `python -m torchmoe demo` trains a small character-level MoE language model.

- :mod:`.corpus` builds the training text from the Python standard library's docstrings (no download).
- :mod:`.model` is the makeMoE-style transformer on :class:`torchmoe.nn.MoE` / :class:`torchmoe.nn.SwitchMoE`,
  with checkpoint save/load and sampling.
- :mod:`.train` is the command line: training loop, progress bar, summary, ``--compare``.
- :mod:`.report` formats the tables and draws the PNG.
"""
from .train import build_parser, main

__all__ = ["main", "build_parser"]
