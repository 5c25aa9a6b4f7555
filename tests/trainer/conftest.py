"""Synthetic trajectories whose token ids come from the real tokenizer's chat template (trainer/synthetic.py)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

from trainer.synthetic import SKILLS, FakeTokenizer, make_gen, make_trajectory  # noqa: E402, F401


@pytest.fixture
def fake_tok():
    return FakeTokenizer()
