"""The demo model's two text domains, found on any machine with Python.

code:    the standard library's top-level modules (Python source)
prose:   pydoc's help topics (the language reference in English), plus licence
         texts from the Python install and /usr/share/common-licenses if present.
numbers: tables of integers as CSV, generated (seeded). The demo model was not
         trained on them; its routing still sets them apart (tools/routing_stats.py),
         which makes them the third domain of bench/shift_bench.py.
Every 10th document of each domain is held out for evaluation and for the
routing-specialisation measurement.
"""
from __future__ import annotations

import sysconfig
from pathlib import Path


def _code_docs() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py"))]


def _prose_docs() -> list[str]:
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    licences = [stdlib / "LICENSE.txt", *sorted(Path("/usr/share/common-licenses").glob("*"))]
    docs += [p.read_text(encoding="utf-8", errors="replace") for p in licences if p.is_file()]
    return docs


def _number_docs() -> list[str]:
    import random

    rng = random.Random(0)
    return ["\n".join(",".join(str(rng.randint(0, 99999)) for _ in range(8)) for _ in range(60)) for _ in range(100)]


def documents(domain: str, split: str) -> list[str]:
    """split: 'train' or 'heldout' (every 10th document)."""
    docs = {"code": _code_docs, "prose": _prose_docs, "numbers": _number_docs}[domain]()
    keep = (lambda i: i % 10 == 5) if split == "heldout" else (lambda i: i % 10 != 5)
    return [d for i, d in enumerate(docs) if keep(i)]


DOMAINS = ("code", "prose")  # what the demo model was trained on
