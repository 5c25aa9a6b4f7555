"""The DeepSpeed learner: consumes trajectory batches, updates the Expert and CS policies, pushes weights.

Read `Learner.setup`, `Learner.step`, `Learner.cleanup` top to bottom. `step` runs five phases, each a method:
drop stale / future / error episodes (`_admit`, `_collate`), reference pass, rewards and advantages, policy pass,
optimizer step (then pushes and checkpoints, `_bookkeeping`), and returns a `trainer.stats.StepStats`.
Two policies (DESIGN §1):
- finetune = "lora" (one-machine default): ONE base model with two LoRA adapters, `expert` and `cs`, in
  one DeepSpeed engine (one optimizer over both adapters; Adam is per-parameter, so this equals two
  optimizers except that gradient clipping sees the joint norm). The base with adapters disabled is the
  frozen reference policy of the KL term.
- finetune = "full": two full models, each its own DeepSpeed engine, and one frozen copy as reference.

Off-policy correction (see `trainer/losses.py` for which log π): a row produced by the weights the
learner holds right now (its version is the current one and no step was taken since the last push) is
on-policy: its old log π is the learner's own detached log π, ratio exactly 1, vanilla policy gradient.
Any other row is off-policy and is clipped against vLLM's recorded logprobs, which are the same quantity: both
are scored over the grammar's admitted tokens at the sampling temperature (`trainer/grammar.py`, `score`).

Values of the GAE critic: a linear head on the REFERENCE model's last hidden state at the last prompt
token. The reference pass is needed anyway (KL), its features do not drift, and the critic's MSE never
touches the policies, so the policy losses stay exactly eq 7 / eq 9.
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gopo_online import events as events_lib
from gopo_online.config import GopoConfig
from gopo_online.events import Key
from gopo_online.metrics_log import MetricsLogger
from gopo_online.models import LORA_TARGETS
from gopo_online.trajectory_store import TrajectoryStore
from gopo_online.types import Trajectory
from trainer.collate import (
    AGENTS,
    CollateResult,
    MicroBatch,
    collate,
    drop_errors,
    drop_sim_flagged,
    split_versions,
)
from trainer.stats import AgentStats, StepStats

__all__ = ["Learner", "behaviour_logprobs", "group_batch", "main", "score"]

PublishFn = Callable[[int, dict[str, Path]], Any]
"""publish(version, {"expert": dir, "cs": dir}): hands exported weights to the weight transport."""
AnnounceFn = Callable[[int, dict[str, Path]], Any]
"""announce(version, exported): tells the rollout side a new version is live (the `weights.updated` fanout)."""

CRITIC_LR = 1e-3
"""Adam lr of the linear critic: a probe on frozen features, so far larger than the policies' lr is safe."""
KEEP_CHECKPOINTS = 2
CONSUMED_IDS_KEPT = 100_000
"""Episode ids a learner remembers (and checkpoints) as consumed: a redelivered trajectory among them is not trained
again, after a restart too (the stream consumer's own dedupe window is as long, but lives in memory only)."""


def _init_single_process_dist() -> None:
    """One-process gloo group on an in-memory store: env rendezvous would listen on ALL interfaces (DESIGN §5)."""
    import torch.distributed as dist

    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed reads it even for one process
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    # DeepSpeed's CPU backend JIT-loads its shared-memory allreduce op at init, through ninja: fast when the cached
    # build is current, but ninja sometimes rebuilds it, and on 2 busy cores that took 4 minutes of the learner's
    # start (seen in the loop test). One process has no collective to speed up: skip the op.
    # `import deepspeed.comm.torch as m` would bind the real `torch` (deepspeed.comm's namespace shadows the
    # submodule), so patch the submodule through sys.modules.
    import importlib
    import sys

    importlib.import_module("deepspeed.comm.torch")
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def ds_config(cfg: GopoConfig, bf16: bool) -> dict[str, Any]:
    """DeepSpeed config from LearnerConfig. The learner owns accumulation: a step has as many micro-batches
    as the batch needs, so accumulation is unmanaged (backward accumulates, step() is the boundary)."""
    lc = cfg.learner
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,
        "gradient_clipping": lc.grad_clip,
        "zero_optimization": {"stage": lc.zero_stage, "overlap_comm": False},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _forward(model, mb: MicroBatch, hidden: bool = False):
    """(logits (B, K, V), last hidden state (B, L, H) or None) of the completion positions of `mb`."""
    out = model(
        input_ids=mb.input_ids,
        attention_mask=mb.attention_mask,
        position_ids=mb.position_ids,
        logits_to_keep=mb.n_completion + 1,
        output_hidden_states=hidden,
        use_cache=False,
    )
    # the last kept logit predicts the token after the sequence: drop it so position k predicts targets[:, k]
    return out.logits[:, :-1], (out.hidden_states[-1] if hidden else None)


def score(model, mb: MicroBatch, hidden: bool = False):
    """(log π (B, K) of the sampled tokens, per-position entropy (B, K), last hidden state or None) under `model`,
    scored as the sampler scored them: masked to the grammar's admitted tokens (`mb.allowed`), at each row's
    recorded temperature (trainer/losses.py)."""
    from trainer.losses import entropy_from_logits, scored_logits, token_logprobs

    logits, h = _forward(model, mb, hidden=hidden)
    z = scored_logits(logits, mb.allowed, mb.temperatures)
    del logits
    return token_logprobs(z, mb.targets), entropy_from_logits(z), h


def behaviour_logprobs(logp, mb: MicroBatch, version: int, steps_since_push: int):
    """(B, K) log π_old of the importance ratio: the learner's own detached log π for rows sampled by exactly the
    weights it holds (their version is the last pushed one and no step was taken since: ratio exactly 1), else
    the recorded logprobs (scored the same way, see trainer/losses.py)."""
    import torch

    if steps_since_push == 0:
        on_policy = (mb.versions == version).unsqueeze(-1)
    else:  # a step since the push: no row was sampled by the current weights
        on_policy = torch.zeros((mb.size, 1), dtype=torch.bool)
    return torch.where(on_policy, logp.detach(), mb.old_logprobs)


def _accumulate(sums: dict[str, float], mb: MicroBatch, logp, res, kl, w: float) -> None:
    """Add one micro-batch's row-weighted contributions to an agent's `AgentStats` fields (named as the fields)."""
    mask = mb.completion_mask
    n_tok = mask.sum().clamp_min(1.0)
    forced = ((mb.allowed.sum(-1) == 1).float() * mask).sum() / n_tok if mb.allowed is not None else 0.0
    gap = ((logp.detach() - mb.old_logprobs).abs() * mask).sum() / n_tok  # |log π_new − recorded log π_old|
    for key, value in (
        ("loss", res.loss), ("pg", res.pg), ("entropy", res.entropy), ("kl", kl.mean()), ("clip_frac", res.clipped),
        ("ratio_mean", res.ratio.mean()), ("adv_mean", mb.advantages.mean()), ("logprob_gap", gap),
        ("forced_frac", forced),
    ):  # fmt: skip
        x = value.detach().item() if hasattr(value, "detach") else float(value)
        sums[key] = sums.get(key, 0.0) + x * w


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass(frozen=True)
class Admission:
    """What phase 1 of `Learner.step` keeps of a batch, and what became of every trajectory in it."""

    ok: list[Trajectory]
    n_stale: int
    future: list[Any]
    n_error: int
    n_sim_flagged: int
    outcomes: dict[str, str]
    """Episode id -> trajectory_store outcome: trained | dropped_stale | rejected_future | error | sim_flagged."""


def admit(trajectories: Iterable[Trajectory], version: int, max_staleness: int) -> Admission:
    """Drop stale and future-version trajectories (`split_versions`), then error episodes, then the ones the
    simulator's quality gates flagged; the rest are trained on."""
    trajectories = list(trajectories)
    fresh, n_stale, future = split_versions(trajectories, version, max_staleness)
    no_error, n_err = drop_errors(fresh)
    ok, n_flagged = drop_sim_flagged(no_error)
    outcomes = dict.fromkeys((t.episode_id for t in trajectories), "dropped_stale")
    outcomes.update((r.episode_id, "rejected_future") for r in future)
    outcomes.update((t.episode_id, "error") for t in fresh)
    outcomes.update((t.episode_id, "sim_flagged") for t in no_error)
    outcomes.update((t.episode_id, "trained") for t in ok)
    return Admission(ok, n_stale, future, n_err, n_flagged, outcomes)


class Learner:
    """Setup / step / checkpoint / cleanup of the two-policy GOPO learner."""

    def __init__(
        self,
        cfg: GopoConfig,
        publish: PublishFn | None = None,
        announce: AnnounceFn | None = None,
        run_dir: Path | None = None,
        optimizer: str = "adamw",
        log: Callable[[str], Any] = print,
    ) -> None:
        if optimizer not in ("adamw", "cpu_adam"):
            raise ValueError(f"optimizer must be adamw|cpu_adam, got {optimizer!r}")
        self.cfg = cfg
        self.lc = cfg.learner
        self.publish = publish
        self.announce = announce
        self.run_dir = Path(run_dir) if run_dir is not None else cfg.run.run_dir
        self.optimizer_name = optimizer
        self.log = log
        self.version = 0
        """Policy version of the weights last pushed (what the servers sample from)."""
        self.global_step = 0
        self.steps_since_push = 0
        self.dropped_stale_total = 0
        self.dropped_future_total = 0
        self.last_outcomes: dict[str, str] = {}
        """Episode id -> what the last `step` did with it (trajectory_store outcomes), decided in `_admit`."""
        self.consumed: collections.OrderedDict[str, None] = collections.OrderedDict()
        """Ids of every trajectory a step saw (whatever its outcome), oldest first, at most `CONSUMED_IDS_KEPT`;
        checkpointed, so a restarted learner drops the redelivered ones its checkpoint already holds."""
        self.unrecorded: dict[str, tuple[str, int]] = {}
        """After a resume: id -> (outcome, learner version) of the checkpoint's last batch. The checkpoint is
        written inside the step, the trajectory store after it: a learner killed in between left these out of
        the store; `_loop` records them when they come back (redelivered) and are dropped as consumed."""
        self.grammar_masks = None
        """trainer.grammar.GrammarMasks when learner.grammar_mask (built in setup)."""
        self.lora = self.lc.finetune == "lora"
        self._last_version_before = 0
        self.push_failures = 0
        """Pushes that failed (a server down): logged; the registry stays at the last confirmed version."""

    # ------------------------------------------------------------------------------------------------------------
    # setup
    # ------------------------------------------------------------------------------------------------------------

    def setup(self) -> None:
        import deepspeed
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from gopo_online.models import resolve_model_path
        from gopo_online.rewards import AdaptiveKLController, PIDLagrangian

        # 1. one process, one thread per op (2 OpenMP threads next to a busy neighbour: 20x slower, DESIGN §5)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        from gopo_online.hardware import resolve_threads

        torch.set_num_threads(resolve_threads(self.cfg.model.learner_threads, "learner"))  # from the cores
        _init_single_process_dist()
        torch.manual_seed(self.cfg.run.seed)
        random.seed(self.cfg.run.seed)
        np.random.seed(self.cfg.run.seed)

        # 2. models: the policies and the frozen reference
        self.model_path = resolve_model_path(self.cfg.model)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.bf16 = self.cfg.model.resolved_dtype == "bfloat16"  # "auto": bf16 only with native bf16 (hardware.py)
        dtype = torch.bfloat16 if self.bf16 else torch.float32  # DeepSpeed fp32 mode wants fp32 params

        def load():
            return AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)

        if self.lora:
            from peft import LoraConfig, get_peft_model

            if self.lc.lora_rank > self.cfg.serving.max_lora_rank:
                raise ValueError(
                    f"learner.lora_rank = {self.lc.lora_rank} exceeds serving.max_lora_rank = "
                    f"{self.cfg.serving.max_lora_rank}: the server could not load the adapters"
                )
            r = self.lc.lora_rank
            lcfg = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
            peft_model = get_peft_model(load(), lcfg, adapter_name="expert")
            peft_model.add_adapter("cs", lcfg)
            self._set_trainable(peft_model)
            modules = {"lora": peft_model}
            self.ref_model = None  # the base with adapters disabled
        else:
            modules = {a: load() for a in AGENTS}
            self.ref_model = load().eval().requires_grad_(False)
        for m in modules.values():
            m.config.use_cache = False

        # 3. DeepSpeed engines (one for both adapters, or one per full model)
        self.engines = {}
        for name, module in modules.items():
            params = [p for p in module.parameters() if p.requires_grad]
            opt = self._make_optimizer(params)
            engine, *_ = deepspeed.initialize(model=module, optimizer=opt, config=ds_config(self.cfg, self.bf16))
            engine.train()
            self.engines[name] = engine
        if self.ref_model is not None and self.bf16:
            self.ref_model.to(torch.bfloat16)

        # 4. critic (GAE) and the two controllers
        hidden = modules[next(iter(modules))].config.hidden_size
        self.critic = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.critic.weight)
        torch.nn.init.zeros_(self.critic.bias)
        self.critic_opt = torch.optim.AdamW(self.critic.parameters(), lr=CRITIC_LR)
        self.kl_ctl = {a: AdaptiveKLController(self.lc.kl_coef, self.lc.kl_target, self.lc.kl_rate) for a in AGENTS}
        if self.lc.grammar_mask:
            from trainer.grammar import GrammarMasks

            # the logits' width (vLLM sizes its xgrammar bitmask by the model's vocab_size too)
            self.grammar_masks = GrammarMasks(self.tokenizer, modules[next(iter(modules))].config.vocab_size)
        self.pid = PIDLagrangian.from_config(self.cfg.rewards)

        # 5. resume, then make the servers serve exactly what the learner holds
        if self.cfg.run.resume and self.latest_checkpoint() is not None:
            self.load_checkpoint()
        if self.publish is not None:
            ahead = self.weights.current_version()
            if ahead > self.version:
                # A crash between a push and the next checkpoint: the servers hold a newer version than the resumed
                # learner. Versions only move forward: its weights go out as the next version (announcing the
                # checkpoint's older number would make the run's pushed versions go backwards).
                self.log(f"[learner] registry at v{ahead} > checkpoint v{self.version}: publishing as v{ahead + 1}")
                self.version = ahead + 1
            self._publish(self.export_weights(self.version))

    def _make_optimizer(self, params):
        import torch

        if self.optimizer_name == "cpu_adam":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(params, lr=self.lc.lr, adamw_mode=True, weight_decay=0.0)
        return torch.optim.AdamW(params, lr=self.lc.lr, weight_decay=0.0)

    @staticmethod
    def _set_trainable(peft_model) -> None:
        # PEFT's set_adapter freezes the inactive adapter; both stay trainable for the shared optimizer
        for n, p in peft_model.named_parameters():
            p.requires_grad_("lora_" in n)

    # ------------------------------------------------------------------------------------------------------------
    # policy / reference access
    # ------------------------------------------------------------------------------------------------------------

    def _engine_of(self, agent: str):
        return self.engines["lora" if self.lora else agent]

    def _policy(self, agent: str):
        """The callable policy of `agent`, adapters switched where needed."""
        engine = self._engine_of(agent)
        if self.lora:
            engine.module.set_adapter(agent)
            self._set_trainable(engine.module)
        return engine

    @contextmanager
    def _reference(self) -> Iterator[Any]:
        if self.lora:
            engine = self.engines["lora"]
            with engine.module.disable_adapter():
                yield engine
        else:
            yield self.ref_model

    # ------------------------------------------------------------------------------------------------------------
    # step: drop stale/error -> reference pass -> rewards and advantages -> policy pass -> optimizer step
    # ------------------------------------------------------------------------------------------------------------

    def step(self, trajectories: Iterable[Trajectory]) -> StepStats:
        """One update of both policies on one batch. Returns the step's metrics (`StepStats`, a mapping)."""
        t0 = time.perf_counter()
        self._last_version_before = self.version  # the version the trajectory store records for this batch
        st = StepStats(agents={a: AgentStats() for a in AGENTS})
        ok = self._admit(trajectories, st)
        col = self._collate(ok, st)
        if any(col.n_rows.values()):
            ref_logp, features = self._reference_pass(col, st)
            adv = self._rewards_and_advantages(ok, col, features, st)
            self._policy_pass(col, ref_logp, st)
            self._optimizer_step(features, adv, st)
            self._bookkeeping(st)
        st.version = self.version
        st.step_time_s = time.perf_counter() - t0
        if any(col.n_rows.values()):
            st.trained_completion_tok_per_s = sum(s.completion_tokens or 0 for s in st.agents.values()) / st.step_time_s
            st.trained_tok_per_s = sum(s.tokens or 0 for s in st.agents.values()) / st.step_time_s
        st.peak_rss_mb = _rss_mb()
        return st

    def _admit(self, trajectories: Iterable[Trajectory], st: StepStats) -> list[Trajectory]:
        """Phase 1: drop stale (counted), future-version (rejected with a reason), error and simulator-flagged
        episodes; what became of each is kept in `last_outcomes` (the trajectory store records it)."""
        a = admit(trajectories, self.version, self.lc.max_staleness)
        for r in a.future:
            self.log(f"[learner] rejected episode {r.episode_id}: {r.reason}: {r.detail}")
        ok, dropped, future, n_err, n_flagged = a.ok, a.n_stale, a.future, a.n_error, a.n_sim_flagged
        self.last_outcomes = a.outcomes
        self._remember(a.outcomes)
        self.dropped_stale_total += dropped
        self.dropped_future_total += len(future)
        st.dropped_stale, st.dropped_stale_total = dropped, self.dropped_stale_total
        st.dropped_future, st.dropped_future_total = len(future), self.dropped_future_total
        st.error_episodes, st.episodes, st.version = n_err, len(ok), self.version
        st.sim_flagged = n_flagged
        trained = [t.min_policy_version for t in ok if t.min_policy_version is not None]
        if trained:
            st.trained_version = min(trained)
        return ok

    def _remember(self, episode_ids: Iterable[str]) -> None:
        for eid in episode_ids:
            self.consumed[eid] = None
            self.consumed.move_to_end(eid)
        while len(self.consumed) > CONSUMED_IDS_KEPT:
            self.consumed.popitem(last=False)

    def split_consumed(self, batch: Iterable[Trajectory]) -> tuple[list[Trajectory], list[Trajectory]]:
        """(new, already consumed) of a batch: a trajectory whose id an earlier step (before a restart too) saw is
        not trained again."""
        new: list[Trajectory] = []
        seen: list[Trajectory] = []
        for t in batch:
            (seen if t.episode_id in self.consumed else new).append(t)
        return new, seen

    def dedupe_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the dedupe: the consumed ids and the last step's outcomes (`unrecorded`)."""
        return {
            "consumed_ids": list(self.consumed),
            "last_outcomes": dict(self.last_outcomes),
            "last_outcomes_version": self._last_version_before,
        }

    def load_dedupe_state(self, state: Mapping[str, Any]) -> None:
        self.consumed = collections.OrderedDict.fromkeys(state.get("consumed_ids", ()))
        version = int(state.get("last_outcomes_version", self.version))
        self.unrecorded = {eid: (o, version) for eid, o in state.get("last_outcomes", {}).items()}

    def _collate(self, ok: list[Trajectory], st: StepStats) -> CollateResult:
        """Rows per agent, with the grammar's admitted-token sets of every constrained completion."""
        col = collate(ok, self.lc.micro_batch_turns, self.pad_id, micro_batch_tokens=self.lc.micro_batch_tokens)
        for a in AGENTS:
            s = st.agents[a]
            s.rows, s.skipped_turns = col.n_rows[a], col.skipped_turns[a]
            s.completion_tokens = int(sum(float(mb.completion_mask.sum()) for mb in col.batches[a]))
            s.tokens = int(sum(int(mb.attention_mask.sum()) for mb in col.batches[a]))
            if self.grammar_masks is None:
                continue
            s.grammar_mismatch = 0
            for mb in col.batches[a]:
                mb.allowed, bad = self.grammar_masks.batch_allowed(mb.grammars, mb.completions, mb.n_completion)
                s.grammar_mismatch += bad
        return col

    def _reference_pass(self, col: CollateResult, st: StepStats):
        """Phase 2 (no grad): reference log π for the KL, critic features (GAE) at each Expert state."""
        import torch

        t_ref = time.perf_counter()
        ref_logp: dict[int, torch.Tensor] = {}
        features: dict[tuple[int, int], torch.Tensor] = {}
        with torch.no_grad(), self._reference() as ref:
            for a in AGENTS:
                for mb in col.batches[a]:
                    want_h = a == "expert" and self.lc.advantage == "gae"
                    ref_logp[id(mb)], _, h = score(ref, mb, hidden=want_h)
                    if want_h:
                        feats = h[torch.arange(mb.size), mb.state_index].float()
                        features.update(zip(mb.keys, feats, strict=True))
        st.ref_time_s = time.perf_counter() - t_ref
        return ref_logp, features

    def _rewards_and_advantages(self, ok: list[Trajectory], col: CollateResult, features, st: StepStats):
        """Phase 3: cost multiplier λ (PID-Lagrangian, InteractCS eq 7-8), joint rewards (gopo eq 10) and each
        row's advantage; the skill distance is centred here (its REINFORCE baseline)."""
        import torch

        from trainer.advantages import compute_advantages, episode_groups

        lc = self.lc
        st.cost_rate = float(np.mean([t.total_cost for t in ok]))
        st.cost_lambda = self.pid.update(st.cost_rate) if lc.use_cost_penalty else 0.0
        values = None
        if features:
            keys = list(features)
            with torch.no_grad():
                v = self.critic(torch.stack([features[k] for k in keys])).squeeze(-1)
            values = dict(zip(keys, v.tolist(), strict=True))
        adv = compute_advantages(ok, lc.advantage, self.cfg.rewards, lc.gamma, lc.gae_lambda, st.cost_lambda, values)
        st.groups = len(episode_groups(ok))
        sig = list(adv.signals.values())
        st.reward_joint = float(np.mean([s.joint for s in sig]))
        st.reward_esndcg = float(np.mean([s.r_expert for s in sig]))
        st.reward_cs = float(np.mean([s.r_cs for s in sig]))
        st.reward_process = float(np.mean([s.process for s in sig]))
        dists = [s.skill_distance for s in sig if s.skill_distance is not None]
        d_mean = float(np.mean(dists)) if dists else 0.0
        if dists:
            st.reward_skill_distance = d_mean
        for a in AGENTS:
            lookup = adv.expert if a == "expert" else adv.cs
            for mb in col.batches[a]:
                mb.set_advantages(lookup)
                mb.skill_distance = (mb.skill_distance - d_mean) * mb.has_distance  # centred: the baseline b
        return adv

    def _policy_pass(self, col: CollateResult, ref_logp, st: StepStats) -> None:
        """Phase 4: loss and backward per micro-batch (gopo eq 7 / eq 9 + β·KL), weighted by its share of rows."""
        from trainer.losses import cs_loss, expert_loss, kl_penalty

        lc = self.lc
        t_pol = time.perf_counter()
        for a in AGENTS:
            sums: dict[str, float] = {}
            n_rows, beta = col.n_rows[a], self.kl_ctl[a].beta
            ratio_max = 0.0
            for mb in col.batches[a]:
                w = mb.size / n_rows
                logp, ent, _ = score(self._policy(a), mb)
                mask = mb.completion_mask
                logp_old = behaviour_logprobs(logp, mb, self.version, self.steps_since_push)
                kl = kl_penalty(logp, ref_logp[id(mb)], mask)  # (B,) step eq 5
                if a == "expert":
                    res = expert_loss(logp, logp_old, mask, mb.advantages, ent, lc.entropy_alpha, lc.clip_eps)
                else:
                    res = cs_loss(
                        logp, logp_old, mask, mb.advantages, mb.skill_distance, ent,
                        lc.lambda_p, lc.lambda_s, lc.lambda_d, lc.clip_eps,
                    )  # fmt: skip
                    sums["skill"] = sums.get("skill", 0.0) + res.skill.item() * w
                self._engine_of(a).backward((res.loss + beta * kl.mean()) * w, scale_wrt_gas=False)
                _accumulate(sums, mb, logp, res, kl, w)
                ratio_max = max(ratio_max, float((res.ratio * (mask if res.ratio.dim() == 2 else 1.0)).max()))
            s = st.agents[a]
            for key, value in sums.items():
                setattr(s, key, value)
            if n_rows:
                s.ratio_max = ratio_max
        st.policy_time_s = time.perf_counter() - t_pol

    def _optimizer_step(self, features, adv, st: StepStats) -> None:
        """Phase 5: optimizer step of the policies, the adaptive β per agent (step eq 7), the critic (GAE)."""
        import torch

        if self.lora:
            self.engines["lora"].step()
        else:
            for a in AGENTS:
                if st.agents[a].rows:
                    self.engines[a].step()
        for a, s in st.agents.items():
            if s.kl is not None:
                s.beta = self.kl_ctl[a].update(s.kl)
        st.kl_total = sum(s.kl for s in st.agents.values() if s.kl is not None)
        if features and adv.critic_targets:
            keys = [k for k in features if k in adv.critic_targets]
            x = torch.stack([features[k] for k in keys])
            y = torch.tensor([adv.critic_targets[k] for k in keys], dtype=torch.float32)
            v_loss = torch.nn.functional.mse_loss(self.critic(x).squeeze(-1), y)
            self.critic_opt.zero_grad()
            v_loss.backward()
            self.critic_opt.step()
            st.critic = v_loss.item()

    def _bookkeeping(self, st: StepStats) -> None:
        """Counters; push every K steps (version + 1), checkpoint every K steps."""
        lc = self.lc
        self.global_step += 1
        self.steps_since_push += 1
        st.step = self.global_step
        if self.global_step % lc.push_every == 0:
            t_push = time.perf_counter()
            new_version = self.version + 1
            exported = self.export_weights(new_version)
            self.version = new_version
            self._publish(exported)
            st.push_time_s = time.perf_counter() - t_push
        if self.global_step % lc.checkpoint_every == 0:
            t_ck = time.perf_counter()
            self.save_checkpoint()
            st.checkpoint_time_s = time.perf_counter() - t_ck

    # ------------------------------------------------------------------------------------------------------------
    # weight export and publication
    # ------------------------------------------------------------------------------------------------------------

    @property
    def weights(self):
        """The run's weight layout (gopo_online.serving.weights.WeightSync; this learner only writes through it)."""
        if getattr(self, "_weights", None) is None:
            from gopo_online.serving.weights import WeightSync

            self._weights = WeightSync.from_config(self.cfg, run_dir=self.run_dir, servers=[])
        return self._weights

    @contextmanager
    def _gathered(self, engine):
        """ZeRO-3 partitions parameters: gather them (on EVERY rank, DESIGN §5) before reading them."""
        if engine.zero_optimization_stage() == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
                yield
        else:
            with nullcontext():
                yield

    def export_weights(self, version: int) -> dict[str, Path]:
        """Write both policies' adapters of `version` once, into their final folders; returns agent -> dir.

        `WeightSync.write` owns the layout, the atomic write (temp folder, fsync, rename), the check that the
        folder is complete, and pruning: a PEFT adapter folder per agent (adapter_config.json +
        adapter_model.safetensors).
        """
        if not self.lora:
            raise NotImplementedError("only LoRA adapters are published (serving.weight_transport = 'lora')")

        def writer(agent: str):
            def write(dest: Path) -> None:
                engine = self._engine_of(agent)
                with self._gathered(engine):
                    engine.module.save_pretrained(dest, selected_adapters=[agent])
                # PEFT puts a non-default adapter in a sub-folder named after it
                for f in (dest / agent).iterdir():
                    os.replace(f, dest / f.name)
                (dest / agent).rmdir()

            return write

        return self.weights.write(version, {a: writer(a) for a in AGENTS})

    def _publish(self, exported: dict[str, Path]) -> None:
        from gopo_online.serving.weights import StaleServerError, WeightPushError

        self.steps_since_push = 0
        if self.publish is not None:
            try:
                self.publish(self.version, exported)
            except (WeightPushError, StaleServerError) as e:
                # A server that died mid-push (or is being restarted) is the controller's to restart and refit,
                # to the registry's version, which a failed push leaves unchanged; training goes on, nothing is
                # announced (the workers keep tagging what the servers serve) and the next push catches up.
                self.push_failures += 1
                self.log(f"[learner] push of v{self.version} failed, training goes on (the next push catches up): {e}")
                return
        if self.announce is not None:
            self.announce(self.version, exported)

    @staticmethod
    def _prune(root: Path, prefix: str, keep: int) -> None:
        done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix))
        for p in done[:-keep]:
            shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------------------------

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def latest_checkpoint(self) -> Path | None:
        pointer = self.checkpoint_root / "latest"
        if not pointer.is_file():
            return None
        path = self.checkpoint_root / pointer.read_text().strip()
        return path if path.is_dir() else None

    def save_checkpoint(self) -> Path:
        """Engines (weights or adapters + optimizer), critic, controllers, counters and RNG; atomic.

        Written to a temp dir, renamed into place, then the `latest` pointer is replaced: a crash at any
        point leaves the previous checkpoint intact and pointed at.
        """
        import torch

        root = self.checkpoint_root
        root.mkdir(parents=True, exist_ok=True)
        name = f"step-{self.global_step:08d}"
        tmp = root / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        for ename, engine in self.engines.items():
            # LoRA: only the adapters (the frozen base is the model folder on disk)
            engine.save_checkpoint(str(tmp), tag=ename, save_latest=False, exclude_frozen_parameters=self.lora)
        torch.save(
            {
                "critic": self.critic.state_dict(),
                "critic_opt": self.critic_opt.state_dict(),
                "torch_rng": torch.get_rng_state(),
            },
            tmp / "learner_tensors.pt",
        )
        np_state = np.random.get_state()
        state = {
            "version": self.version,
            "global_step": self.global_step,
            "steps_since_push": self.steps_since_push,
            "dropped_stale_total": self.dropped_stale_total,
            "dropped_future_total": self.dropped_future_total,
            "finetune": self.lc.finetune,
            "kl": {a: c.state_dict() for a, c in self.kl_ctl.items()},
            "pid": self.pid.state_dict(),
            "py_rng": _jsonable(random.getstate()),
            "np_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            **self.dedupe_state(),
        }
        (tmp / "learner_state.json").write_text(json.dumps(state))
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = root / f".latest-{os.getpid()}"
        pointer_tmp.write_text(name)
        os.replace(pointer_tmp, root / "latest")
        self._prune(root, "step-", KEEP_CHECKPOINTS)
        return final

    def load_checkpoint(self, path: Path | None = None) -> Path:
        """Restore everything `save_checkpoint` wrote (default: the latest checkpoint)."""
        import torch

        path = Path(path) if path is not None else self.latest_checkpoint()
        if path is None:
            raise FileNotFoundError(f"no checkpoint under {self.checkpoint_root}")
        state = json.loads((path / "learner_state.json").read_text())
        if state["finetune"] != self.lc.finetune:
            raise ValueError(f"checkpoint {path} is finetune={state['finetune']}, config says {self.lc.finetune}")
        for ename, engine in self.engines.items():
            load_path, _ = engine.load_checkpoint(
                str(path), tag=ename, load_module_strict=not self.lora, load_optimizer_states=True
            )
            if load_path is None:
                raise RuntimeError(f"DeepSpeed could not load engine {ename!r} from {path}")
        tensors = torch.load(path / "learner_tensors.pt", weights_only=True)
        self.critic.load_state_dict(tensors["critic"])
        self.critic_opt.load_state_dict(tensors["critic_opt"])
        torch.set_rng_state(tensors["torch_rng"])
        self.version = int(state["version"])
        self.global_step = int(state["global_step"])
        self.steps_since_push = int(state["steps_since_push"])
        self.dropped_stale_total = int(state["dropped_stale_total"])
        self.dropped_future_total = int(state.get("dropped_future_total", 0))
        for a, c in self.kl_ctl.items():
            c.load_state_dict(state["kl"][a])
        self.pid.load_state_dict(state["pid"])
        random.setstate(_tuplify(state["py_rng"]))
        s = state["np_rng"]
        np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), *s[2:]))
        self.load_dedupe_state(state)
        if self.lora:
            self._set_trainable(self.engines["lora"].module)
        self.log(f"[learner] resumed from {path}: step {self.global_step}, version {self.version}")
        return path

    # ------------------------------------------------------------------------------------------------------------
    # cleanup
    # ------------------------------------------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Drop the engines and leave the process group (a second Learner in the same process starts clean)."""
        import gc

        import deepspeed.comm as ds_dist
        import torch.distributed as dist

        self.engines = {}
        self.ref_model = None
        gc.collect()
        if ds_dist.is_initialized():
            ds_dist.destroy_process_group()  # also drops DeepSpeed's cached group handles
        elif dist.is_initialized():
            dist.destroy_process_group()


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, tuple | list) else x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


# ---------------------------------------------------------------------------------------------------------------------
# main: `gopo-online learner`
# ---------------------------------------------------------------------------------------------------------------------


def main(
    cfg: GopoConfig,
    source: Iterable[list[Trajectory]] | None = None,
    publish: PublishFn | None = None,
    announce: AnnounceFn | None = None,
    on_metrics: Callable[[Mapping[str, float]], Any] | None = None,
) -> int:
    """Consume batches until the run budget (max_steps / max_minutes) or Ctrl-C; checkpoint on the way out.

    Injected parts win. Without a `source` it reads the broker (`cfg.broker.url`, or env GOPO_BROKER_URL when
    the controller started an embedded broker): batches from `gopo_online.stream.TrajectoryConsumer`, acked only
    after the step that used them succeeded; it announces `weights.updated` through `WeightsAnnouncer` and sends
    learner/push events to the controller (events fanout). Without `publish`, and with `serving.policy.url` set,
    weights go to the live policy server through `WeightSync.publish` (one LoRA adapter per agent).
    Every event it sends (gopo_online.events) is also logged by a `MetricsLogger` to run_dir/learner_metrics.jsonl,
    the learner's own record when no controller listens. Three parts: `_setup`, `_loop`, `_cleanup`.
    """
    run = _setup(cfg, source, publish, announce)
    try:
        run.learner.setup()
        if run.learner.unrecorded:  # resumed: which of the checkpoint's last batch the store already holds
            for eid in run.store.recorded(run.learner.unrecorded):
                run.learner.unrecorded.pop(eid, None)
        _loop(cfg, run, on_metrics)
    finally:
        _cleanup(run)
    return 0


@dataclass
class _Run:
    """What `main` wires up once: the learner, where batches come from, and where acks / events / records go."""

    learner: Learner
    source: Iterable[list[Trajectory]]
    sync: Any
    """The run's `WeightSync` when the learner pushes to a live server itself (None when `publish` is injected)."""
    ack: Callable[[list[str]], Any]
    """Acks the given episodes (only what a step trained on: a batch may leave group members for the next)."""
    emit: Callable[[Any], Any]
    """Sends a `gopo_online.events.Event` to the controller and keeps it in the learner's own record."""
    store: TrajectoryStore
    closers: list[Callable[[], Any]]
    stop: threading.Event
    restore_sigint: Callable[[], Any]


def _setup(
    cfg: GopoConfig,
    source: Iterable[list[Trajectory]] | None,
    publish: PublishFn | None,
    announce: AnnounceFn | None,
) -> _Run:
    closers: list[Callable[[], Any]] = []
    ack: Callable[[list[str]], Any] = lambda episode_ids: None  # noqa: E731
    # SIGINT (the controller's stop, or Ctrl-C) lets the current step and its push finish, then checkpoints:
    # an interrupt in the middle of an optimizer step would checkpoint half-updated weights.
    stop = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
    previous = signal.signal(signal.SIGINT, lambda signum, frame: stop.set()) if in_main else None
    broadcast: Callable[[Any], Any] = lambda event: None  # noqa: E731
    own_log = MetricsLogger(cfg.run.run_dir, tensorboard=False, filename="learner_metrics.jsonl")
    closers.append(own_log.close)

    def emit(event: Any) -> None:
        own_log.log_event(event)
        broadcast(event)

    store = TrajectoryStore(cfg.run.run_dir)  # every trajectory seen, with what became of it
    closers.append(store.close)
    sync = None
    if publish is None and cfg.serving.policy.url:
        from gopo_online.serving.weights import WeightSync

        sync = WeightSync.from_config(cfg, run_dir=cfg.run.run_dir)

        def publish(version: int, adapters: Any, sync: Any = sync) -> Any:
            # started on its own (the cluster layout), the learner may be set up before the policy server is
            sync.wait_serving(cfg.serving.policy.startup_timeout_s)
            return sync.publish(version, adapters)

    if source is None:
        consumer, announcer, events = _stream_parts(cfg)
        closers += [consumer.close, announcer.close, events.close]
        source = _batches(
            consumer, cfg.learner.batch_episodes, should_stop=stop.is_set, group_size=cfg.learner.group_size
        )
        ack = _tolerant_ack(consumer)
        consumer.on_dead_letter = store.dead_letter
        broadcast = _safe_emit(events)
        if announce is None:

            def announce(version: int, exported: dict[str, Path]) -> None:
                from gopo_online.serving.weights import WeightSync

                a = (sync or WeightSync.from_config(cfg, run_dir=cfg.run.run_dir, servers=[])).announcement(version)
                announcer.announce(a["version"], a["transport"], a["path"], a["served_models"])
                last = sync.last_result if sync is not None else None
                latency = last.write_s + last.push_s if last is not None and last.version == version else None
                emit(events_lib.push(version, latency, a["served_models"]))

    learner = Learner(cfg, publish=publish, announce=announce)
    restore = (lambda: signal.signal(signal.SIGINT, previous)) if in_main else (lambda: None)
    return _Run(learner, source, sync, ack, emit, store, closers, stop, restore)


def _loop(cfg: GopoConfig, run: _Run, on_metrics: Callable[[Mapping[str, float]], Any] | None) -> None:
    """One step per batch; record what became of each trajectory; ack after the step; events; stop at the budget."""
    learner = run.learner
    t_start = time.time()
    for delivered in run.source:
        batch, consumed = learner.split_consumed(delivered)
        if consumed:
            _drop_consumed(learner, run, consumed)
            if not batch:
                continue
        t_step = time.perf_counter()
        step_before, version_before = learner.global_step, learner.version
        metrics = learner.step(batch)
        run.store.append_batch([(t, learner.last_outcomes[t.episode_id]) for t in batch], version_before)
        run.ack([t.episode_id for t in batch])
        if learner.global_step > step_before:
            run.emit(events_lib.learner(metrics, learner.global_step, time.perf_counter() - t_step))
        else:  # nothing fresh in the batch (all stale or failed): no update, but the drop counts are news
            run.emit(events_lib.system({Key.STALE_DROPPED: metrics.get(Key.STALE_DROPPED, 0)}))
        if on_metrics is not None:
            on_metrics(metrics)
        if cfg.run.max_steps is not None and learner.global_step >= cfg.run.max_steps:
            break
        if cfg.run.max_minutes is not None and time.time() - t_start > 60 * cfg.run.max_minutes:
            break
        if run.stop.is_set():
            learner.log("[learner] stop requested; writing a checkpoint")
            break


def _drop_consumed(learner: Learner, run: _Run, consumed: list[Trajectory]) -> None:
    """Redelivered trajectories an earlier step (before a restart too: the checkpoint keeps the ids) already saw:
    acked, not trained again. Those of the checkpoint's last batch that never reached the store (the learner died
    between the checkpoint and the store's write) are recorded now, with the outcome the step gave them."""
    late = [t for t in consumed if t.episode_id in learner.unrecorded]
    for t in late:
        outcome, version = learner.unrecorded.pop(t.episode_id)
        run.store.append(t, outcome, version)  # type: ignore[arg-type]
    run.ack([t.episode_id for t in consumed])
    ids = [t.episode_id for t in consumed]
    learner.log(f"[learner] {len(ids)} redelivered trajectories already trained on (not again): {ids[:8]}")


def _cleanup(run: _Run) -> None:
    """Checkpoint what was trained, free the engines, close the stream parts, give SIGINT back."""
    learner = run.learner
    try:
        if learner.global_step and getattr(learner, "engines", None):
            learner.save_checkpoint()
    finally:
        learner.cleanup()
        for close in run.closers:
            close()
        run.restore_sigint()


def _tolerant_ack(consumer: Any) -> Callable[[list[str]], Any]:
    """Acks that fail because the broker went away are not the step's failure: the unacked messages come back
    (restored by the broker or the controller) and the learner drops them as consumed."""

    def ack(episode_ids: list[str]) -> None:
        try:
            consumer.ack(episode_ids)
        except consumer.broker_errors as e:
            print(f"[learner] acks of {len(episode_ids)} trajectories lost with the broker connection ({e!r}); "
                  "their redelivery is dropped as consumed", flush=True)  # fmt: skip

    return ack


def _safe_emit(events: Any) -> Callable[[Any], None]:
    def emit(event: Any) -> None:
        try:
            events.send(event)
        except Exception as e:  # noqa: BLE001 - a lost dashboard sample must not stop training
            print(f"[learner] could not send a {event.kind} event: {e!r}", flush=True)

    return emit


def _stream_parts(cfg: GopoConfig):
    # lazily: the stream module pulls in kombu and the broker client
    from gopo_online.stream import EventPublisher, TrajectoryConsumer, WeightsAnnouncer

    url = cfg.broker.url or os.environ.get("GOPO_BROKER_URL")
    if not url:
        raise RuntimeError("the learner needs a broker: set broker.url or GOPO_BROKER_URL (or inject `source=`)")
    return TrajectoryConsumer(url, cfg, auto_ack=False), WeightsAnnouncer(url, cfg), EventPublisher(url, cfg)


def _batches(
    consumer,
    batch_episodes: int,
    timeout_s: float = 5.0,
    should_stop: Callable[[], bool] = lambda: False,
    group_size: int = 1,
    max_outage_s: float = 180.0,
    retry_s: float = 2.0,
    log: Callable[[str], Any] = print,
) -> Iterator[list[Trajectory]]:
    """Batches from the consumer until `should_stop()` (checked at least every `timeout_s`), whole GRPO groups
    together (`group_batch`); what a batch leaves behind stays unacked for the next one.

    The broker unreachable (restarted by the controller, paused) is waited out, retrying every `retry_s`, for up
    to `max_outage_s`; then the error propagates (the learner exits and is restarted). Messages handed over on
    the lost connection are trained all the same; their acks are lost with it, so the broker delivers them again
    later and the learner drops them as consumed (`Learner.split_consumed`)."""
    pending: list[Trajectory] = []
    errors = getattr(consumer, "broker_errors", ())
    down_since: float | None = None
    while not should_stop():
        try:
            got = consumer.get_batch(batch_episodes, timeout_s)
        except errors as e:
            now = time.monotonic()
            if down_since is None:
                down_since = now
                log(f"[learner] the broker is unreachable ({type(e).__name__}: {e}); waiting up to {max_outage_s:.0f}s")
            elif now - down_since > max_outage_s:
                raise
            time.sleep(retry_s)
            continue
        if down_since is not None:
            log(f"[learner] the broker is back after {time.monotonic() - down_since:.1f}s")
            down_since = None
        pending += got
        if len(pending) < batch_episodes:
            continue
        # wait for the missing members of a group only while little is held: a failed member never arrives
        force = len(pending) >= batch_episodes + group_size
        batch, pending = group_batch(pending, batch_episodes, group_size, force=force)
        if batch:
            yield batch


def group_batch(
    pending: list[Trajectory], batch_episodes: int, group_size: int, force: bool = False
) -> tuple[list[Trajectory], list[Trajectory]]:
    """(batch, rest): whole groups (all `group_size` members with one group id present), oldest group first,
    until the batch holds >= `batch_episodes`; a trajectory without a group id is a complete group of one.
    Without enough complete groups the batch is empty, unless `force`: then it is topped up with the oldest of
    the rest (a group's missing member may be an error record without a group id, or lost)."""
    by: dict[str, list[Trajectory]] = {}
    for t in pending:
        by.setdefault(f"g:{t.group_id}" if t.group_id else f"e:{t.episode_id}", []).append(t)
    chosen: list[Trajectory] = []
    for key, members in by.items():
        if len(chosen) >= batch_episodes:
            break
        if key.startswith("e:") or len(members) >= group_size:
            chosen += members
    if len(chosen) < batch_episodes:
        if not force:
            return [], pending
        taken = {id(t) for t in chosen}
        chosen += [t for t in pending if id(t) not in taken][: batch_episodes - len(chosen)]
    taken = {id(t) for t in chosen}
    return chosen, [t for t in pending if id(t) not in taken]
