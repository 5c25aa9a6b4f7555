"""Trajectories → per-agent micro-batches of tensors: the only place the wire records become tensors.

Each agent decision (the Expert's skill sequence, the CS reply) of each turn is one row: the recorded
prompt token ids followed by the sampled completion token ids, exactly as vLLM saw and produced them
(never re-tokenised). Rows are LEFT-padded so every completion ends at the last position: the model then
only needs logits for the last K + 1 positions (`logits_to_keep`), K = the longest completion in the
micro-batch, which keeps the (B, K, V) logits small next to the (B, L, V) a full forward would make.
Left padding shifts positions, so explicit `position_ids` restart at 0 on each row's first real token.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from gopo_online.types import Generation, GrammarRef, Trajectory

__all__ = [
    "AGENTS",
    "CollateResult",
    "MicroBatch",
    "Rejected",
    "TurnSample",
    "collate",
    "drop_errors",
    "samples",
    "split_fresh",
    "split_versions",
]

AGENTS = ("expert", "cs")
AdvKey = tuple[int, int]
"""(index of the trajectory in the list given to `collate`, 1-based turn index)."""


def split_fresh(trajs: Iterable[Trajectory], current_version: int, max_staleness: int) -> tuple[list[Trajectory], int]:
    """Keep trajectories produced at most `max_staleness` policy versions ago; return (fresh, dropped_count).

    A trajectory's age is `current_version − min_policy_version` (its OLDEST generation decides: every
    token of it must be within the importance-ratio budget). One with no recorded generation has no
    version and is kept here; `collate` skips its turns and counts them. A trajectory with a generation from
    a version the learner has not published yet (negative age) is not counted here: `split_versions` drops it.
    """
    fresh, dropped, _ = split_versions(trajs, current_version, max_staleness)
    return fresh, dropped


@dataclass(frozen=True)
class Rejected:
    """A trajectory the learner will not train on, and why (`stale` or `future_version`)."""

    episode_id: str
    reason: str
    detail: str


def split_versions(
    trajs: Iterable[Trajectory], current_version: int, max_staleness: int
) -> tuple[list[Trajectory], int, list[Rejected]]:
    """(kept, stale count, rejected future-version trajectories).

    Stale: age = current_version − min_policy_version > max_staleness. Future: some generation's policy
    version is above `current_version` (negative age): no published weights produced it, so its logprobs
    belong to no policy the learner knows (a restarted learner, a foreign run on the same broker) and an
    importance ratio against them is meaningless. Both are dropped; the future ones come back with a reason.
    """
    fresh, dropped, future = [], 0, []
    for t in trajs:
        versions = [g.policy_version for turn in t.turns for g in (turn.expert_gen, turn.cs_gen) if g is not None]
        if versions and max(versions) > current_version:
            future.append(
                Rejected(
                    t.episode_id,
                    "future_version",
                    f"policy version {max(versions)} > learner version {current_version}",
                )
            )
        elif versions and current_version - min(versions) > max_staleness:
            dropped += 1
        else:
            fresh.append(t)
    return fresh, dropped, future


def drop_errors(trajs: Iterable[Trajectory]) -> tuple[list[Trajectory], int]:
    """(ok trajectories, number of error trajectories): error episodes carry no trainable decision."""
    trajs = list(trajs)
    ok = [t for t in trajs if t.status == "ok"]
    return ok, len(trajs) - len(ok)


def drop_sim_flagged(trajs: Iterable[Trajectory]) -> tuple[list[Trajectory], int]:
    """(trajectories without a simulator quality-gate flag, number flagged): a flagged episode's user turns broke
    the simulator's own rules even after a regeneration (spoke as the agent, repeated itself, contradicted the
    scenario), so its rewards say more about the simulator than about the policy."""
    trajs = list(trajs)
    kept = [t for t in trajs if not t.sim_flagged]
    return kept, len(trajs) - len(kept)


@dataclass(frozen=True)
class TurnSample:
    """One agent decision before padding."""

    key: AdvKey
    agent: str
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    version: int
    reward: float
    """R^E_t (recorded ESNDCG) for the Expert, R^A_t (judge) for the CS agent."""
    skill_distance: float | None
    cost: float
    temperature: float = 1.0
    """Sampling temperature the completion was drawn at (its logprobs are tempered by it)."""
    grammar: GrammarRef | None = None
    """The grammar that constrained the decode (None: unconstrained)."""


def _gen(turn, agent: str) -> Generation | None:
    return turn.expert_gen if agent == "expert" else turn.cs_gen


def samples(trajs: Sequence[Trajectory], agent: str) -> tuple[list[TurnSample], int]:
    """All trainable decisions of `agent`; returns (samples, skipped) where skipped counts turns without a
    generation, without rewards, with an empty completion, or of an error trajectory."""
    if agent not in AGENTS:
        raise ValueError(f"agent must be one of {AGENTS}, got {agent!r}")
    out, skipped = [], 0
    for i, traj in enumerate(trajs):
        for turn in traj.turns:
            g = _gen(turn, agent)
            if traj.status != "ok" or g is None or turn.rewards is None or not g.completion_token_ids:
                skipped += 1
                continue
            r = turn.rewards
            out.append(
                TurnSample(
                    key=(i, turn.index),
                    agent=agent,
                    prompt_ids=g.prompt_token_ids,
                    completion_ids=g.completion_token_ids,
                    logprobs=g.logprobs,
                    version=g.policy_version,
                    reward=r.r_expert if agent == "expert" else r.r_cs,
                    skill_distance=r.skill_distance,
                    cost=turn.cost,
                    temperature=g.temperature,
                    grammar=g.grammar,
                )
            )
    return out, skipped


@dataclass
class MicroBatch:
    """B rows of one agent. L = longest prompt+completion, K = longest completion.

    The model is run on `input_ids` with `logits_to_keep = K + 1`; dropping the last of those logits
    leaves (B, K, V) logits aligned with `targets`.
    """

    agent: str
    keys: list[AdvKey]
    input_ids: torch.Tensor
    """(B, L) int64, left-padded prompt + completion."""
    attention_mask: torch.Tensor
    """(B, L) int64, 0 on padding."""
    position_ids: torch.Tensor
    """(B, L) int64, 0 at each row's first real token."""
    targets: torch.Tensor
    """(B, K) int64: the last K tokens of each row (completion tokens where `completion_mask` is 1)."""
    completion_mask: torch.Tensor
    """(B, K) fp32, 1 on completion tokens."""
    old_logprobs: torch.Tensor
    """(B, K) fp32, vLLM's recorded logprobs, masked and tempered (0 off the mask)."""
    state_index: torch.Tensor
    """(B,) int64: position of the last prompt token (the state s_t a critic reads)."""
    versions: torch.Tensor
    """(B,) int64 policy version that produced each completion."""
    rewards: torch.Tensor
    """(B,) fp32 recorded per-agent reward (R^E or R^A)."""
    skill_distance: torch.Tensor
    """(B,) fp32 d(a^A, a^E), 0 where unknown (see `has_distance`)."""
    has_distance: torch.Tensor
    """(B,) fp32 1 where the skill distance was computed."""
    costs: torch.Tensor
    """(B,) fp32 operational cost of the turn."""
    advantages: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    """(B,) fp32 one advantage per sequence (filled from the `advantages` mapping, or later)."""
    temperatures: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    """(B,) fp32 sampling temperature of each completion (the recorded logprobs are tempered by it)."""
    grammars: list[GrammarRef | None] = field(default_factory=list)
    """Per row: the grammar that constrained the decode, None where unconstrained."""
    completions: list[tuple[int, ...]] = field(default_factory=list)
    """Per row: the completion token ids (unpadded), what the grammar replay walks."""
    allowed: torch.Tensor | None = None
    """(B, K, V) bool admitted tokens per completion position, set by the learner (`trainer.grammar`);
    None = every token allowed. Padding positions allow everything."""

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def n_completion(self) -> int:
        return self.targets.shape[1]

    def set_advantages(self, lookup: Mapping[AdvKey, float]) -> None:
        """Fill `advantages` from a {(traj index, turn index): Â} mapping (KeyError names a missing key)."""
        self.advantages = torch.tensor([float(lookup[k]) for k in self.keys], dtype=torch.float32)


def _pad(rows: list[TurnSample], agent: str, pad_id: int, advantages: Mapping[AdvKey, float] | None) -> MicroBatch:
    B = len(rows)
    L = max(len(r.prompt_ids) + len(r.completion_ids) for r in rows)
    K = max(len(r.completion_ids) for r in rows)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attn = torch.zeros((B, L), dtype=torch.long)
    pos = torch.zeros((B, L), dtype=torch.long)
    cmask = torch.zeros((B, K), dtype=torch.float32)
    old = torch.zeros((B, K), dtype=torch.float32)
    state_index = torch.zeros(B, dtype=torch.long)
    for b, r in enumerate(rows):
        seq = list(r.prompt_ids) + list(r.completion_ids)
        n, c = len(seq), len(r.completion_ids)
        input_ids[b, L - n :] = torch.tensor(seq, dtype=torch.long)
        attn[b, L - n :] = 1
        pos[b, L - n :] = torch.arange(n)
        cmask[b, K - c :] = 1.0
        old[b, K - c :] = torch.tensor(r.logprobs, dtype=torch.float32)
        state_index[b] = L - c - 1
    mb = MicroBatch(
        agent=agent,
        keys=[r.key for r in rows],
        input_ids=input_ids,
        attention_mask=attn,
        position_ids=pos,
        targets=input_ids[:, L - K :].clone(),
        completion_mask=cmask,
        old_logprobs=old,
        state_index=state_index,
        versions=torch.tensor([r.version for r in rows], dtype=torch.long),
        rewards=torch.tensor([r.reward for r in rows], dtype=torch.float32),
        skill_distance=torch.tensor([r.skill_distance or 0.0 for r in rows], dtype=torch.float32),
        has_distance=torch.tensor([r.skill_distance is not None for r in rows], dtype=torch.float32),
        costs=torch.tensor([r.cost for r in rows], dtype=torch.float32),
        temperatures=torch.tensor([r.temperature for r in rows], dtype=torch.float32),
        grammars=[r.grammar for r in rows],
        completions=[r.completion_ids for r in rows],
    )
    if advantages is not None:
        mb.set_advantages(advantages)
    else:
        mb.advantages = torch.zeros(B, dtype=torch.float32)
    return mb


@dataclass
class CollateResult:
    batches: dict[str, list[MicroBatch]]
    """Agent name → its micro-batches."""
    skipped_turns: dict[str, int]
    """Agent name → decisions that could not be trained on (no generation / rewards, error episode)."""
    error_trajectories: int

    @property
    def n_rows(self) -> dict[str, int]:
        return {a: sum(mb.size for mb in mbs) for a, mbs in self.batches.items()}


def collate(
    trajs: Sequence[Trajectory],
    micro_batch_turns: int,
    pad_id: int = 0,
    advantages: Mapping[str, Mapping[AdvKey, float]] | None = None,
    micro_batch_tokens: int | None = None,
) -> CollateResult:
    """Per-agent micro-batches of at most `micro_batch_turns` rows and, with `micro_batch_tokens`, at most that
    many padded tokens (rows x longest row; a single longer row is a micro-batch of its own).

    The token bound is the learner's memory bound: a forward + backward keeps every layer's activations of every
    padded token (float32 SmolLM2-135M: ~3.4 MB a token, so 8 rows of 700 tokens took 19 GB and the kernel killed
    the learner on a 24 GiB box). Rows are sorted by length before batching so each micro-batch pads little.
    `advantages` maps an agent to {(traj index in `trajs`, turn index): Â}; without it advantages are zeros to be
    set later (`MicroBatch.set_advantages`, e.g. after a critic pass). Error trajectories are skipped and counted.
    """
    if micro_batch_turns < 1:
        raise ValueError(f"micro_batch_turns must be >= 1, got {micro_batch_turns}")
    if micro_batch_tokens is not None and micro_batch_tokens < 1:
        raise ValueError(f"micro_batch_tokens must be >= 1, got {micro_batch_tokens}")
    batches: dict[str, list[MicroBatch]] = {}
    skipped: dict[str, int] = {}
    for agent in AGENTS:
        rows, skipped[agent] = samples(trajs, agent)
        rows.sort(key=lambda r: (len(r.prompt_ids) + len(r.completion_ids), r.key))
        adv = None if advantages is None else advantages[agent]
        batches[agent] = [
            _pad(chunk, agent, pad_id, adv) for chunk in _chunks(rows, micro_batch_turns, micro_batch_tokens)
        ]
    return CollateResult(batches, skipped, sum(t.status != "ok" for t in trajs))


def _chunks(rows: Sequence[TurnSample], max_rows: int, max_tokens: int | None) -> list[Sequence[TurnSample]]:
    """Consecutive runs of `rows` (sorted by length) of at most `max_rows` rows and `max_tokens` padded tokens."""
    out: list[Sequence[TurnSample]] = []
    start = 0
    for i in range(len(rows)):
        n = i - start + 1
        padded = n * (len(rows[i].prompt_ids) + len(rows[i].completion_ids))  # sorted: row i is the longest
        if n > 1 and (n > max_rows or (max_tokens is not None and padded > max_tokens)):
            out.append(rows[start:i])
            start = i
    if start < len(rows):
        out.append(rows[start:])
    return out
