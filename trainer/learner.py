"""The DeepSpeed learner: consumes trajectory batches, updates the Expert and CS policies, pushes weights.

Read `Learner.setup`, `Learner.step`, `Learner.cleanup` top to bottom. Two policies (DESIGN §1):
- finetune = "lora" (one-machine default): ONE base model with two LoRA adapters, `expert` and `cs`, in
  one DeepSpeed engine (one optimizer over both adapters; Adam is per-parameter, so this equals two
  optimizers except that gradient clipping sees the joint norm). The base with adapters disabled is the
  frozen reference policy of the KL term.
- finetune = "full": two full models, each its own DeepSpeed engine, and one frozen copy as reference.

Off-policy correction (see `trainer/losses.py` for which log π): a row produced by the weights the
learner holds right now (its version is the current one and no step was taken since the last push) is
on-policy: its old log π is the learner's own detached log π, ratio exactly 1, vanilla policy gradient.
Any other row is off-policy and is clipped against vLLM's recorded raw logprobs.

Values of the GAE critic: a linear head on the REFERENCE model's last hidden state at the last prompt
token. The reference pass is needed anyway (KL), its features do not drift, and the critic's MSE never
touches the policies, so the policy losses stay exactly eq 7 / eq 9.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from gopo_online.config import GopoConfig
from gopo_online.types import Trajectory
from trainer.collate import AGENTS, MicroBatch, collate, drop_errors, split_fresh

__all__ = ["Learner", "main"]

PublishFn = Callable[[int, dict[str, Path]], Any]
"""publish(version, {"expert": dir, "cs": dir}): hands exported weights to the weight transport."""
AnnounceFn = Callable[[int, dict[str, Path]], Any]
"""announce(version, exported): tells the rollout side a new version is live (the `weights.updated` fanout)."""

CRITIC_LR = 1e-3
"""Adam lr of the linear critic: a probe on frozen features, so far larger than the policies' lr is safe."""
KEEP_CHECKPOINTS = 2
KEEP_EXPORTS = 3
"""Weight versions kept on disk: a server may still be loading the previous one."""
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


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


def _rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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
        self.lora = self.lc.finetune == "lora"

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
            lcfg = LoraConfig(
                r=self.lc.lora_rank, lora_alpha=2 * self.lc.lora_rank, lora_dropout=0.0, target_modules=LORA_TARGETS
            )
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
        self.kl_ctl = {a: AdaptiveKLController(self.lc.kl_coef, self.lc.kl_target) for a in AGENTS}
        self.pid = PIDLagrangian.from_config(self.cfg.rewards)

        # 5. resume, then make the servers serve exactly what the learner holds
        if self.cfg.run.resume and self.latest_checkpoint() is not None:
            self.load_checkpoint()
        if self.publish is not None:
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
    # step
    # ------------------------------------------------------------------------------------------------------------

    def step(self, trajectories: Iterable[Trajectory]) -> dict[str, float]:
        """One update of both policies on one batch. Returns namespaced metrics."""
        import torch

        from trainer.advantages import compute_advantages
        from trainer.losses import cs_loss, entropy_from_logits, expert_loss, kl_penalty, token_logprobs

        t0 = time.perf_counter()
        lc = self.lc
        m: dict[str, float] = {}

        # 1. drop stale (counted) and error episodes
        fresh, dropped = split_fresh(trajectories, self.version, lc.max_staleness)
        ok, n_err = drop_errors(fresh)
        self.dropped_stale_total += dropped
        m.update({"learner/dropped_stale": dropped, "learner/dropped_stale_total": self.dropped_stale_total})
        m.update({"learner/error_episodes": n_err, "learner/episodes": len(ok), "learner/version": self.version})
        trained = [t.min_policy_version for t in ok if t.min_policy_version is not None]
        if trained:
            m["learner/trained_version"] = min(trained)  # oldest policy version this update learns from
        col = collate(ok, lc.micro_batch_turns, self.pad_id)
        for a in AGENTS:
            m[f"learner/rows_{a}"] = col.n_rows[a]
            m[f"learner/skipped_turns_{a}"] = col.skipped_turns[a]
        if not any(col.n_rows.values()):
            m["sys/step_time_s"] = time.perf_counter() - t0
            return m

        # 2. cost multiplier λ from this batch's cost rate (PID-Lagrangian, InteractCS eq 7-8)
        cost_rate = float(np.mean([t.total_cost for t in ok]))
        lam = self.pid.update(cost_rate) if lc.use_cost_penalty else 0.0
        m.update({"reward/cost_rate": cost_rate, "learner/cost_lambda": lam})

        # 3. reference pass (no grad): reference log π for the KL, critic features for GAE
        t_ref = time.perf_counter()
        ref_logp: dict[int, torch.Tensor] = {}
        features: dict[tuple[int, int], torch.Tensor] = {}
        with torch.no_grad(), self._reference() as ref:
            for a in AGENTS:
                for mb in col.batches[a]:
                    want_h = a == "expert" and lc.advantage == "gae"
                    logits, h = _forward(ref, mb, hidden=want_h)
                    ref_logp[id(mb)] = token_logprobs(logits, mb.targets)
                    if want_h:
                        feats = h[torch.arange(mb.size), mb.state_index].float()
                        features.update(zip(mb.keys, feats, strict=True))
        m["sys/ref_time_s"] = time.perf_counter() - t_ref

        # 4. rewards and advantages from the recorded components (joint reward eq 10 under the current schedule)
        values = None
        if features:
            keys = list(features)
            with torch.no_grad():
                v = self.critic(torch.stack([features[k] for k in keys])).squeeze(-1)
            values = dict(zip(keys, v.tolist(), strict=True))
        adv = compute_advantages(ok, lc.advantage, self.cfg.rewards, lc.gamma, lc.gae_lambda, lam, values)
        for a in AGENTS:
            lookup = adv.expert if a == "expert" else adv.cs
            for mb in col.batches[a]:
                mb.set_advantages(lookup)
        sig = list(adv.signals.values())
        m.update(
            {
                "reward/joint": float(np.mean([s.joint for s in sig])),
                "reward/esndcg": float(np.mean([s.r_expert for s in sig])),
                "reward/cs": float(np.mean([s.r_cs for s in sig])),
                "reward/process": float(np.mean([s.process for s in sig])),
            }
        )
        dists = [s.skill_distance for s in sig if s.skill_distance is not None]
        d_mean = float(np.mean(dists)) if dists else 0.0
        if dists:
            m["reward/skill_distance"] = d_mean

        # 5. policy pass with grad, one backward per micro-batch; each loss is weighted by its share of rows
        on_policy_version = self.version if self.steps_since_push == 0 else None
        sums: dict[str, float] = {}

        def acc(key: str, value: float, w: float) -> None:
            sums[key] = sums.get(key, 0.0) + value * w

        t_pol = time.perf_counter()
        for a in AGENTS:
            n_rows = col.n_rows[a]
            beta = self.kl_ctl[a].beta
            for mb in col.batches[a]:
                w = mb.size / n_rows
                policy = self._policy(a)
                logits, _ = _forward(policy, mb)
                logp = token_logprobs(logits, mb.targets)  # raw π_1, the definition vLLM recorded
                ent = entropy_from_logits(logits)
                del logits
                mask = mb.completion_mask
                on_policy = (mb.versions == on_policy_version).unsqueeze(-1)
                logp_old = torch.where(on_policy, logp.detach(), mb.old_logprobs)
                kl = kl_penalty(logp, ref_logp[id(mb)], mask)  # (B,) step eq 5
                if a == "expert":
                    res = expert_loss(logp, logp_old, mask, mb.advantages, ent, lc.entropy_alpha, lc.clip_eps)
                else:
                    d = (mb.skill_distance - d_mean) * mb.has_distance  # centred: the REINFORCE baseline b
                    res = cs_loss(
                        logp, logp_old, mask, mb.advantages, d, ent, lc.lambda_p, lc.lambda_s, lc.lambda_d, lc.clip_eps
                    )
                    acc("loss/cs_skill", res.skill.item(), w)
                total = res.loss + beta * kl.mean()
                self._engine_of(a).backward(total * w, scale_wrt_gas=False)
                acc(f"loss/{a}", res.loss.item(), w)
                acc(f"loss/{a}_pg", res.pg.item(), w)
                acc(f"loss/{a}_entropy", res.entropy.item(), w)
                acc(f"loss/kl_{a}", kl.mean().item(), w)
                acc(f"learner/clip_frac_{a}", res.clipped.item(), w)
                acc(f"learner/ratio_{a}", res.ratio.mean().item(), w)
                acc(f"learner/adv_{a}", mb.advantages.mean().item(), w)
                gap = ((logp.detach() - mb.old_logprobs).abs() * mask).sum() / mask.sum().clamp_min(1.0)
                acc(f"learner/logprob_gap_{a}", gap.item(), w)
            if not self.lora and n_rows:
                self.engines[a].step()
        if self.lora:
            self.engines["lora"].step()
        m["sys/policy_time_s"] = time.perf_counter() - t_pol
        m.update(sums)
        m["loss/kl"] = sum(m.get(f"loss/kl_{a}", 0.0) for a in AGENTS)
        for a in AGENTS:
            if f"loss/kl_{a}" in m:
                m[f"learner/kl_beta_{a}"] = self.kl_ctl[a].update(m[f"loss/kl_{a}"])

        # 6. critic regression to the GAE returns
        if features and adv.critic_targets:
            keys = [k for k in features if k in adv.critic_targets]
            x = torch.stack([features[k] for k in keys])
            y = torch.tensor([adv.critic_targets[k] for k in keys], dtype=torch.float32)
            v_loss = torch.nn.functional.mse_loss(self.critic(x).squeeze(-1), y)
            self.critic_opt.zero_grad()
            v_loss.backward()
            self.critic_opt.step()
            m["loss/critic"] = v_loss.item()

        # 7. bookkeeping: push every K steps (version + 1), checkpoint every K steps
        self.global_step += 1
        self.steps_since_push += 1
        m["learner/step"] = self.global_step
        if self.global_step % lc.push_every == 0:
            t_push = time.perf_counter()
            new_version = self.version + 1
            exported = self.export_weights(new_version)
            self.version = new_version
            self._publish(exported)
            m["sys/push_time_s"] = time.perf_counter() - t_push
        if self.global_step % lc.checkpoint_every == 0:
            t_ck = time.perf_counter()
            self.save_checkpoint()
            m["sys/checkpoint_time_s"] = time.perf_counter() - t_ck
        m["learner/version"] = self.version
        m["sys/step_time_s"] = time.perf_counter() - t0
        m["sys/peak_rss_mb"] = _rss_mb()
        return m

    # ------------------------------------------------------------------------------------------------------------
    # weight export and publication
    # ------------------------------------------------------------------------------------------------------------

    @property
    def export_root(self) -> Path:
        return self.run_dir / "weights"

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
        """Write both policies' weights for `version` (atomically: temp dir + rename); returns agent → dir.

        LoRA: a PEFT adapter folder per agent (`adapter_config.json` + `adapter_model.safetensors`).
        Full: a folder per agent with `model.safetensors` + `config.json` (what vLLM's reload_weights reads).
        """
        import torch
        from safetensors.torch import save_file

        final = self.export_root / f"v{version:06d}"
        tmp = self.export_root / f".tmp-v{version:06d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        out = {}
        for a in AGENTS:
            engine = self._engine_of(a)
            with self._gathered(engine):
                if self.lora:
                    engine.module.save_pretrained(tmp, selected_adapters=[a])  # PEFT writes tmp/<adapter>/
                else:
                    if engine.zero_optimization_stage() == 3:
                        sd = engine._zero3_consolidated_16bit_state_dict()
                    else:
                        sd = engine.module.state_dict()
                    dtype = torch.bfloat16 if self.bf16 else torch.float32
                    if engine.module.config.tie_word_embeddings:
                        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}  # shared storage: vLLM re-ties
                    sd = {k: v.detach().to(dtype).contiguous().clone() for k, v in sd.items()}
                    (tmp / a).mkdir()
                    save_file(sd, str(tmp / a / "model.safetensors"), metadata={"format": "pt"})
                    engine.module.config.save_pretrained(tmp / a)
            out[a] = final / a
        (tmp / "version.json").write_text(json.dumps({"version": version, "finetune": self.lc.finetune}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._prune(self.export_root, "v", KEEP_EXPORTS)
        return out

    def _publish(self, exported: dict[str, Path]) -> None:
        self.steps_since_push = 0
        if self.publish is not None:
            self.publish(self.version, exported)
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
            "finetune": self.lc.finetune,
            "kl": {a: c.state_dict() for a, c in self.kl_ctl.items()},
            "pid": self.pid.state_dict(),
            "py_rng": _jsonable(random.getstate()),
            "np_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
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
        for a, c in self.kl_ctl.items():
            c.load_state_dict(state["kl"][a])
        self.pid.load_state_dict(state["pid"])
        random.setstate(_tuplify(state["py_rng"]))
        s = state["np_rng"]
        np.random.set_state((s[0], np.array(s[1], dtype=np.uint32), *s[2:]))
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
    on_metrics: Callable[[dict[str, float]], Any] | None = None,
) -> int:
    """Consume batches until the run budget (max_steps / max_minutes) or Ctrl-C; checkpoint on the way out.

    Injected parts win. Without a `source` it reads the broker (`cfg.broker.url`, or env GOPO_BROKER_URL when
    the controller started an embedded broker): batches from `gopo_online.stream.TrajectoryConsumer`, acked only
    after the step that used them succeeded; it announces `weights.updated` through `WeightsAnnouncer` and sends
    learner/push events to the controller (events fanout). Without `publish`, and with `serving.policy.url` set,
    weights go to the live policy server through `serving_publisher` (one LoRA adapter per agent).
    Metrics also go to run_dir/learner_metrics.jsonl.
    """
    closers: list[Callable[[], Any]] = []
    ack: Callable[[], Any] = lambda: None  # noqa: E731
    # SIGINT (the controller's stop, or Ctrl-C) lets the current step and its push finish, then checkpoints:
    # an interrupt in the middle of an optimizer step would checkpoint half-updated weights.
    stop_requested = False

    def request_stop(signum: int, frame: Any) -> None:
        nonlocal stop_requested
        stop_requested = True

    in_main = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
    previous = signal.signal(signal.SIGINT, request_stop) if in_main else None
    emit: Callable[..., Any] = lambda *a, **k: None  # noqa: E731
    publishers = None
    if publish is None and cfg.serving.policy.url:
        publishers = serving_publishers(cfg, cfg.run.run_dir)
        publish = ServingPush(publishers, cfg.serving.policy.url)
    if source is None:
        consumer, announcer, events = _stream_parts(cfg)
        closers += [consumer.close, announcer.close, events.close]
        source = _batches(consumer, cfg.learner.batch_episodes, should_stop=lambda: stop_requested)
        ack = consumer.ack
        emit = _safe_emit(events)
        if announce is None:
            transport = cfg.learner.finetune

            def announce(version: int, exported: dict[str, Path]) -> None:
                path = str(next(iter(exported.values())).parent)
                served = {a: publishers[a].served_model(version) if publishers else f"{a}-v{version}" for a in exported}
                announcer.announce(version, transport, path, served)
                m = {"sys/policy_version": float(version)}
                if isinstance(publish, ServingPush) and publish.last_latency_s is not None:
                    m["sys/push_latency_s"] = publish.last_latency_s
                emit("push", m, {"served": served}, step=version)

    learner = Learner(cfg, publish=publish, announce=announce)
    metrics_path = learner.run_dir / "learner_metrics.jsonl"
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    try:
        learner.setup()
        if publishers is not None:
            _catch_up_with_registry(learner, publishers)
        for batch in source:
            t_step = time.perf_counter()
            step_before = learner.global_step
            metrics = learner.step(batch)
            ack()
            with metrics_path.open("a") as f:
                f.write(json.dumps({"time": time.time(), **metrics}) + "\n")
            if learner.global_step > step_before:
                emit("learner", _dashboard_metrics(metrics, time.perf_counter() - t_step), step=learner.global_step)
            else:  # nothing fresh in the batch (all stale or failed): no update, but the drop counts are news
                emit("system", {"sys/stale_dropped": float(metrics.get("learner/dropped_stale_total", 0))})
            if on_metrics is not None:
                on_metrics(metrics)
            if cfg.run.max_steps is not None and learner.global_step >= cfg.run.max_steps:
                break
            if cfg.run.max_minutes is not None and time.time() - t_start > 60 * cfg.run.max_minutes:
                break
            if stop_requested:
                learner.log("[learner] stop requested; writing a checkpoint")
                break
    finally:
        try:
            if learner.global_step and getattr(learner, "engines", None):
                learner.save_checkpoint()
        finally:
            learner.cleanup()
            for close in closers:
                close()
            if in_main:
                signal.signal(signal.SIGINT, previous)
    return 0


def serving_publishers(cfg: GopoConfig, run_dir: Path) -> dict[str, Any]:
    """One `WeightPublisher` per agent: a LoRA adapter hot-loaded in place under the agent's name on the policy
    server; each agent's version registry lives in run_dir/weights/serving/<agent> (the controller's refit reads
    the same place)."""
    from gopo_online.serving.weights import LoRATransport, WeightPublisher, admin_token

    if cfg.serving.weight_transport != "lora" or cfg.learner.finetune != "lora":
        raise NotImplementedError(
            "the learner pushes to a live server as LoRA adapters (serving.weight_transport = learner.finetune = "
            "'lora'); full weights of two policies would need two policy servers"
        )
    return {
        a: WeightPublisher(
            LoRATransport(served_name=cfg.model.served_name, adapter_name=a),
            Path(run_dir) / "weights" / "serving" / a,
            [cfg.serving.policy.url],
            token=admin_token(cfg.serving),
            timeout_s=cfg.serving.request_timeout_s,
        )
        for a in AGENTS
    }


class ServingPush:
    """The learner's `publish` callback for the live policy server: each agent's adapter through its publisher."""

    def __init__(self, publishers: dict[str, Any], server_url: str) -> None:
        self.publishers = publishers
        self.server_url = server_url
        self.last_latency_s: float | None = None
        """Write + push + version read-back of the last published version, both agents (seconds)."""

    def __call__(self, version: int, exported: dict[str, Path]) -> None:
        latency = 0.0
        for agent, pub in self.publishers.items():
            current = pub.registry.current_version()
            if version > current:
                r = pub.publish(version, adapter_dir=exported[agent])
                latency += r.write_s + r.push_s
            elif version == current and not pub.refit(self.server_url):
                # setup() re-publishes what it holds: the server must serve exactly that (stale until refit)
                raise RuntimeError(f"could not refit {self.server_url} to {agent} version {version}")
            # version < current: the registry ran ahead of the last checkpoint; _catch_up_with_registry fixes it
        self.last_latency_s = latency


def _catch_up_with_registry(learner: Learner, publishers: dict[str, Any]) -> None:
    """After a crash between a push and the next checkpoint the servers hold a newer version than the resumed
    learner. Versions only move forward: publish the learner's weights as the next version."""
    ahead = max(p.registry.current_version() for p in publishers.values())
    if ahead > learner.version:
        learner.log(f"[learner] registry at v{ahead} > checkpoint v{learner.version}: publishing as v{ahead + 1}")
        learner.version = ahead + 1
        learner._publish(learner.export_weights(learner.version))


def _dashboard_metrics(m: dict[str, float], wall_s: float) -> dict[str, float]:
    """The learner event's metrics under the dashboard's keys (gopo_online.dashboard docstring), plus the rest."""
    out = {k: float(v) for k, v in m.items() if isinstance(v, int | float) and math.isfinite(v)}
    if "learner/trained_version" in m:
        out["sys/trained_version"] = float(m["learner/trained_version"])
    out["sys/policy_version"] = float(m.get("learner/version", 0))
    out["sys/stale_dropped"] = float(m.get("learner/dropped_stale_total", 0))
    if "learner/cost_lambda" in m:
        out["loss/lambda"] = float(m["learner/cost_lambda"])
    out["sys/step_wall_s"] = wall_s
    return out


def _safe_emit(events: Any) -> Callable[..., None]:
    def emit(kind: str, metrics: dict[str, float], payload: dict[str, Any] | None = None, step: int = 0) -> None:
        try:
            events.emit(kind, metrics, payload, step=step)
        except Exception as e:  # noqa: BLE001 - a lost dashboard sample must not stop training
            print(f"[learner] could not send a {kind} event: {e!r}", flush=True)

    return emit


def _stream_parts(cfg: GopoConfig):
    # lazily: the stream module pulls in kombu and the broker client
    from gopo_online.stream import EventPublisher, TrajectoryConsumer, WeightsAnnouncer

    url = cfg.broker.url or os.environ.get("GOPO_BROKER_URL")
    if not url:
        raise RuntimeError("the learner needs a broker: set broker.url or GOPO_BROKER_URL (or inject `source=`)")
    return TrajectoryConsumer(url, cfg, auto_ack=False), WeightsAnnouncer(url, cfg), EventPublisher(url, cfg)


def _batches(
    consumer, batch_episodes: int, timeout_s: float = 5.0, should_stop: Callable[[], bool] = lambda: False
) -> Iterator[list[Trajectory]]:
    """Full batches from the consumer until `should_stop()` (checked at least every `timeout_s`)."""
    batch: list[Trajectory] = []
    while not should_stop():
        batch += consumer.get_batch(batch_episodes - len(batch), timeout_s)
        if len(batch) >= batch_episodes:
            yield batch
            batch = []
