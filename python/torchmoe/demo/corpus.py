"""The demo's training text, built on the spot from the Python standard library's docstrings.

No download: every Python installation carries its standard library, and its docstrings are a
megabyte of real English prose mixed with code, signatures and doctests — a good character-level
corpus. :func:`build_corpus` imports a fixed list of modules (pure, side-effect-free imports), and
walks each one in sorted order: the module docstring, then every public class and function defined
by it (and the public methods of those classes), each as a ``qualified.name`` line followed by its
``inspect.getdoc`` text. Repeated docstrings (inherited ones) are kept once. The text is reduced to
printable ASCII plus newlines and cut at ``max_chars``, so it is identical on every run of the same
Python version (other versions document their modules a little differently).
"""
import importlib
import inspect
import warnings
from typing import Dict, List, Optional, Tuple

import torch

# Alphabetical. Modules missing from a build (no _ssl, no _sqlite3, ...) are skipped.
MODULES: Tuple[str, ...] = tuple(
    """
    abc argparse array ast asyncio base64 bdb binascii bisect builtins bz2 calendar cmath cmd code codecs
    collections colorsys concurrent.futures configparser contextlib contextvars copy csv dataclasses
    datetime decimal difflib dis doctest email.message email.utils enum filecmp fileinput fnmatch
    fractions ftplib functools gc getopt gettext glob graphlib gzip hashlib heapq hmac html http.client
    http.cookiejar http.server imaplib importlib inspect io ipaddress itertools json keyword linecache
    locale logging lzma mailbox math mimetypes multiprocessing numbers operator optparse os pathlib pdb
    pickle pkgutil platform plistlib poplib pprint profile pstats queue quopri random re reprlib runpy
    sched secrets selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl stat
    statistics string struct subprocess symtable sys sysconfig tarfile tempfile textwrap threading time
    timeit token tokenize trace traceback tracemalloc types typing unicodedata unittest urllib.parse
    urllib.request uuid warnings weakref xml.dom.minidom xml.etree.ElementTree xmlrpc.client zipfile
    zlib zoneinfo
    """.split()
)

DEFAULT_MAX_CHARS = 1_000_000


def _defined_in(obj, module_name: str) -> bool:
    owner = getattr(obj, "__module__", None) or ""
    # C accelerators report their private twin (`_json`, `_socket`) as the owner.
    return owner == module_name or owner.startswith(module_name + ".") or owner.lstrip("_") == module_name


def _printable(text: str) -> str:
    return "".join(c for c in text if c == "\n" or " " <= c <= "~")


def build_corpus(
    max_chars: int = DEFAULT_MAX_CHARS, modules: Tuple[str, ...] = MODULES, used: Optional[List[str]] = None
) -> str:
    """Concatenated standard-library docstrings: deterministic, at most ``max_chars`` characters.

    ``used``, when given, receives the names of the modules that contributed text.
    """
    seen = set()
    parts: List[str] = []
    total = 0

    def add(title: str, obj) -> None:
        nonlocal total
        try:
            doc = inspect.getdoc(obj)
        except Exception:
            return
        if not doc or doc in seen:
            return
        seen.add(doc)
        piece = _printable(f"{title}\n{doc}\n\n")
        parts.append(piece)
        total += len(piece)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules and aliases warn on access
        for name in modules:
            if total >= max_chars:
                break
            try:
                module = importlib.import_module(name)
            except Exception:
                continue
            if used is not None:
                used.append(name)
            add(name, module)
            for attr in sorted(vars(module)):
                if attr.startswith("_"):
                    continue
                obj = getattr(module, attr, None)
                if not (inspect.isclass(obj) or inspect.isroutine(obj)):
                    continue
                if name != "builtins" and not _defined_in(obj, name):
                    continue
                add(f"{name}.{attr}", obj)
                if inspect.isclass(obj):
                    for member in sorted(vars(obj)):
                        if not member.startswith("_"):
                            add(f"{name}.{attr}.{member}", getattr(obj, member, None))
    return "".join(parts)[:max_chars]


class CharTokenizer:
    """Characters <-> ids over a fixed, sorted alphabet (makeMoE's `stoi`/`itos`)."""

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        self.stoi: Dict[str, int] = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(text)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            raise ValueError(f"characters outside the vocabulary: {''.join(unknown)!r}")
        return torch.tensor([self.stoi[c] for c in text], dtype=torch.long)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)


def split_train_heldout(
    data: torch.Tensor, heldout_every: int = 10, chunk: int = 4096
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every ``heldout_every``-th chunk of ``chunk`` tokens goes to the held-out set, the rest to training.

    Interleaving (rather than makeMoE's "last 10%") lets both sets cover every module, so the held-out
    loss measures generalisation to unseen text, not to an unseen part of the library.
    """
    # Small texts (tests) still get a few held-out chunks.
    chunk = max(1, min(chunk, data.numel() // (2 * heldout_every)))
    n_chunks = (data.numel() + chunk - 1) // chunk
    heldout = torch.zeros(n_chunks, dtype=torch.bool)
    heldout[heldout_every - 1 :: heldout_every] = True
    mask = heldout.repeat_interleave(chunk)[: data.numel()]
    return data[~mask], data[mask]
