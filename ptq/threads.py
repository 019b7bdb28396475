"""How many threads ptq computes with: onnxruntime's intra-op pool in every session and torch's (block
reconstruction). ``use_threads(n)`` sets it for the process (the ``threads`` setting, ``--threads``); 0 means every
core (``os.cpu_count()``). Batch jobs that run several ptq processes side by side give each its share of the cores:
processes that each spin a pool as wide as the machine slow each other far more than their share
(docs/FINDINGS.md)."""
from __future__ import annotations

import os

_threads = 0


def use_threads(n: int) -> None:
    global _threads
    _threads = int(n)


def thread_count() -> int:
    return _threads or os.cpu_count() or 1


def ort_options(threads: int | None = None):
    """onnxruntime CPU SessionOptions: ``threads`` intra-op threads (default ``thread_count()``), warnings off."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads or thread_count()
    return opts
