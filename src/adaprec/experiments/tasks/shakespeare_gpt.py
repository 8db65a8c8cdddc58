"""shakespeare-gpt: the quickstart's character GPT (2 layers, 256 wide, block 128): see char_transformer."""

from __future__ import annotations

from adaprec.experiments.tasks.base import Task
from adaprec.experiments.tasks.char_transformer import make_task as _make


def make_task() -> Task:
    return _make("shakespeare-gpt")
