"""The allowed-token sets of a constrained decode, rebuilt in the learner so old and new log π mean the same thing.

vLLM applies the structured-output bitmask (xgrammar) to the logits before it samples and before it takes the
logprobs it returns: a recorded logprob is log softmax over the tokens the grammar admitted at that position.
The learner replays the same grammar with the same library over the recorded completion tokens and gets, per
completion position, the same admitted set; `trainer.losses.masked_logits` then scores over that set. Without
it the learner's full-vocabulary log π is lower by log Z (Z = the admitted mass) and every importance ratio of
a constrained row carries Σ log Z ≤ 0.

A grammar is rebuilt from the `GrammarRef` the agent recorded on its `Generation` (the grammar text itself can
be hundreds of kB for a 12-skill pool). A completion the matcher rejects (a grammar that changed between
sampling and training, a tokenizer mismatch) is not an error: from the rejected token on, every token counts
as allowed, and the row is counted as a mismatch (`learner/grammar_mismatch_<agent>`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from gopo_online.types import GrammarRef

__all__ = ["GrammarMasks", "grammar_text"]


@functools.lru_cache(maxsize=256)
def grammar_text(ref: GrammarRef) -> str:
    """The EBNF the agent sent to vLLM for `ref` (the same functions build it)."""
    if ref.kind == "expert_skills":
        from gopo_online.skills import expert_grammar

        return expert_grammar(ref.choices, ref.max_items)
    if ref.kind == "cs_action":
        from gopo_online.serving.agents import cs_grammar

        return cs_grammar(ref.choices)
    raise ValueError(f"unknown grammar kind {ref.kind!r}")


def _unpack(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(W,) int32 xgrammar bitmask (bit j of word i = token 32 i + j) -> (vocab_size,) bool."""
    shifts = torch.arange(32, dtype=torch.int32)
    return ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten()[:vocab_size]


class GrammarMasks:
    """Replays recorded completions through xgrammar: `allowed(ref, ids)` -> (K, V) bool of admitted tokens.

    `tokenizer` is the HF tokenizer of the served model, `vocab_size` the model's logits width (vLLM builds its
    xgrammar tokenizer info the same way, `TokenizerInfo.from_huggingface(tokenizer, vocab_size=...)`).
    """

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = int(vocab_size)
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)
        self._compiled: dict[GrammarRef, Any] = {}

    def _grammar(self, ref: GrammarRef):
        if ref not in self._compiled:
            if len(self._compiled) > 256:
                self._compiled.clear()
            self._compiled[ref] = self.compiler.compile_grammar(grammar_text(ref))
        return self._compiled[ref]

    def allowed(self, ref: GrammarRef, completion_ids: Sequence[int]) -> tuple[torch.Tensor, bool]:
        """((K, V) bool: token w was admitted before completion position k, mismatch?) for one completion."""
        xgr = self._xgr
        K, V = len(completion_ids), self.vocab_size
        out = torch.ones((K, V), dtype=torch.bool)
        matcher = xgr.GrammarMatcher(self._grammar(ref))
        bitmask = xgr.allocate_token_bitmask(1, V)
        for k, tok in enumerate(completion_ids):
            if matcher.is_terminated():
                return out, True  # tokens after the grammar's end: vLLM would have stopped
            matcher.fill_next_token_bitmask(bitmask)
            row = _unpack(bitmask[0], V)
            if not (0 <= tok < V and bool(row[tok])) or not matcher.accept_token(int(tok)):
                return out, True  # from here on every token counts as allowed (see the module docstring)
            out[k] = row
        return out, False

    def batch_allowed(
        self, grammars: Sequence[GrammarRef | None], completions: Sequence[Sequence[int]], width: int
    ) -> tuple[torch.Tensor | None, int]:
        """((B, width, V) bool for right-aligned completions, or None when no row was constrained; mismatches).

        Row b's completion occupies the last len(completions[b]) positions (the collate layout); everything
        else (padding, unconstrained rows) allows every token.
        """
        if not any(g is not None for g in grammars):
            return None, 0
        out = torch.ones((len(grammars), width, self.vocab_size), dtype=torch.bool)
        mismatches = 0
        for b, (ref, ids) in enumerate(zip(grammars, completions, strict=True)):
            if ref is None or not ids:
                continue
            rows, bad = self.allowed(ref, ids)
            out[b, width - len(ids) :] = rows
            mismatches += int(bad)
        return out, mismatches
