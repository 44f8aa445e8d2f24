"""Quiet model loading: hide load-time output a user cannot act on, and nothing else."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from transformers.utils import logging as hf_logging

ST_LOGGER = "sentence_transformers.base.model"  # logs "No device provided, using cpu" (INFO) on every load


@contextmanager
def quiet_loading(load_report: bool = True) -> Iterator[None]:
    """Hide sentence-transformers' INFO lines (the device it picked, the folder it reads) and transformers'
    "Loading weights" bar. Warnings still show, so do download bars (the Hub's), and so does that logger's INFO
    when a user set its level.

    Args:
        load_report: Keep transformers' load report (its warnings about missing or unexpected weights). Pass
            False where the report is known to be noise, e.g. a dense architecture loading an upcycled folder
            would list every expert weight as unexpected.
    """
    st_logger = logging.getLogger(ST_LOGGER)
    level = st_logger.level
    if level == logging.NOTSET:
        st_logger.setLevel(max(st_logger.getEffectiveLevel(), logging.WARNING))
    set_hook = getattr(hf_logging, "set_tqdm_hook", None)  # transformers 5, whose loading shows the bar
    previous = set_hook(_hidden_bar) if set_hook else None
    verbosity = hf_logging.get_verbosity()
    if not load_report:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        st_logger.setLevel(level)
        if set_hook:
            set_hook(previous)


def _hidden_bar(factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return factory(*args, **{**kwargs, "disable": True})
