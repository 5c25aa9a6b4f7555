"""One root config shared by every process: one TOML file plus `--set key=value` overrides.

Every model forbids unknown keys; a typo is a `ConfigError` naming the key and the closest valid one.
Validators check and never rewrite; derived values are properties. Imports nothing heavy.
"""

from __future__ import annotations

import difflib
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from gopo_online.errors import InputError, short_repr

DEFAULT_CONFIG_PATH = Path(__file__).parent / "configs" / "default.toml"


def gopo_home() -> Path:
    """Cache root for prepared models, the shared venv and embedded broker data."""
    return Path(os.environ.get("GOPO_HOME", Path.home() / ".cache" / "gopo-online"))


def _numeric_not_bool(annotation: Any) -> bool:
    """True for int/float fields (also `int | None`) that do not also admit a bool."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    kinds = set(args or (annotation,))
    return bool(kinds & {int, float}) and bool not in kinds


class Section(BaseModel):
    model_config = ConfigDict(
        extra="forbid", frozen=True, use_attribute_docstrings=True, validate_default=True, allow_inf_nan=False
    )

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads `batch_episodes = true` as 1; a boolean where a number belongs is a mistake
        if (
            isinstance(value, bool)
            and info.field_name
            and _numeric_not_bool(cls.model_fields[info.field_name].annotation)
        ):
            raise ValueError("a number is needed, not a boolean")
        return value


class RunConfig(Section):
    name: str = "gopo"
    """Run name; the run directory is `output_dir/name`."""
    output_dir: Path = Path("runs")
    """Where metrics, checkpoints, logs and reports go."""
    seed: int = 0
    """Global seed for persona sampling, dispatch order and learner init."""
    max_episodes: int | None = Field(default=200, ge=1)
    """Budget: stop after this many finished episodes (None: no limit)."""
    max_steps: int | None = Field(default=None, ge=1)
    """Budget: stop after this many learner steps (None: no limit)."""
    max_minutes: float | None = Field(default=30.0, gt=0)
    """Budget: stop after this many wall-clock minutes (None: no limit)."""
    resume: bool = True
    """Resume from the run directory's latest checkpoint when one exists."""

    @property
    def run_dir(self) -> Path:
        return self.output_dir / self.name


class ModelConfig(Section):
    path: Path | None = None
    """Local HF model folder for both policies; None uses the prepared SmolLM2-135M-Instruct."""
    served_name: str = "policy"
    """Base model name on the policy server."""
    dtype: Literal["bfloat16", "float32", "float16", "auto"] = "auto"
    """Weights dtype of both the vLLM server and the learner. "auto": bfloat16 on a GPU; on a CPU bfloat16 only where
    /proc/cpuinfo has avx512_bf16 or amx_bf16, else float32 (emulated bf16 halved decode and stalled the learner on
    an AVX2-only CPU; see gopo_online/hardware.py and docs/throughput.md)."""
    server_threads: int | None = Field(default=None, ge=1)
    """OpenMP threads of each vLLM CPU server; None: from the core count (1 on <= 2 cores, else about half of the
    cores left after one for workers/broker; docs/throughput.md)."""
    learner_threads: int | None = Field(default=None, ge=1)
    """Intra-op threads of the learner; None: from the core count (the other half)."""

    @property
    def resolved_dtype(self) -> str:
        """`dtype` with "auto" resolved for a CPU from this machine's flags (the learner's dtype; the server resolves
        for its own device)."""
        from gopo_online.hardware import resolve_dtype

        return resolve_dtype(self.dtype, device="cpu")


class ServerConfig(Section):
    url: str | None = None
    """Root URL (http://host:port) of an already running server to join; None: `train`/`serve` start one."""
    host: str = "127.0.0.1"
    """Bind address; keep loopback unless you set an admin token."""
    port: int | None = Field(default=None, ge=1, le=65535)
    """Port; None picks a free one."""
    max_model_len: int = Field(default=2048, ge=256)
    """Context length vLLM reserves."""
    kv_cache_gb: float = Field(default=1.0, gt=0)
    """CPU KV cache (VLLM_CPU_KVCACHE_SPACE) in GiB; GPU uses gpu_memory_utilization."""
    gpu_memory_utilization: float = Field(default=0.4, gt=0, le=1)
    """GPU only: fraction of GPU memory this server may take."""
    enforce_eager: bool = True
    """CPU: skip graph compilation (ready in ~35 s instead of ~120 s, DESIGN §5)."""
    extra_args: list[str] = []
    """Extra `vllm serve` arguments."""
    startup_timeout_s: float = Field(default=300.0, gt=0)
    """How long readiness may take before start-up fails with the server's log tail."""


class ServingConfig(Section):
    device: Literal["auto", "cpu", "gpu"] = "auto"
    """Where vLLM runs; auto picks the GPU when CUDA is available."""
    policy: ServerConfig = ServerConfig()
    """The server that serves both agents (Expert and CS)."""
    simulator: Literal["same", "separate", "external"] = "same"
    """Simulator/judge backend: the policy server's base model, a second vLLM server, or `external_url`."""
    simulator_server: ServerConfig = ServerConfig()
    """Settings of the second server when simulator = "separate"."""
    external_url: str | None = None
    """OpenAI-compatible base URL (…/v1) for simulator = "external"."""
    external_model: str | None = None
    """Model name at `external_url`."""
    api_key_env: str = "OPENAI_API_KEY"
    """Environment variable holding the external API key."""
    request_timeout_s: float = Field(default=120.0, gt=0)
    """Timeout for every model request."""
    max_retries: int = Field(default=3, ge=0)
    """Retries of a failed model request (connection errors, 5xx) before the episode fails."""
    weight_transport: Literal["full", "lora"] = "lora"
    """How refreshed weights reach the live server; the loop runs only "lora" (LoRA hot-load; "full" is rejected)."""
    admin_token_env: str = "GOPO_ADMIN_TOKEN"
    """Env var with the token required by admin endpoints when a server binds beyond loopback."""
    max_lora_rank: int = Field(default=16, ge=1)
    """--max-lora-rank when weight_transport = "lora"."""

    @model_validator(mode="after")
    def _check(self) -> ServingConfig:
        if self.simulator == "external" and not (self.external_url and self.external_model):
            raise ValueError("serving.simulator = 'external' needs serving.external_url and serving.external_model")
        return self


class ExpertConfig(Section):
    history_k: int = Field(default=4, ge=1)
    """Turns of history in the Expert's state s^E_t."""
    max_skills: int = Field(default=5, ge=1, le=5)
    """Longest skill sequence the grammar admits (gopo caps at 5)."""
    temperature: float = Field(default=1.0, ge=0)
    """Sampling temperature of the Expert."""
    max_tokens: int = Field(default=128, ge=8)
    """Completion budget of one Expert decision (5 long skill names exceeded 64 tokens in a 30-min run)."""
    skill_codes: bool = True
    """Write two-letter skill codes (`ga, ex`; ~2 tokens a skill) mapped back to the names, not the names (~6-12
    tokens a skill); the grammar keeps 1..max_skills distinct pool skills either way."""


class CSConfig(Section):
    temperature: float = Field(default=0.8, ge=0)
    """Sampling temperature of the CS agent."""
    max_tokens: int = Field(default=96, ge=8)
    """Completion budget of one CS reply."""
    history_k: int = Field(default=4, ge=1)
    """Turns of history in the CS prompt."""


class AgentsConfig(Section):
    expert: ExpertConfig = ExpertConfig()
    cs: CSConfig = CSConfig()


class SimulatorConfig(Section):
    persona_file: Path | None = None
    """Persona bank (YAML/JSONL); None uses the bank shipped in simulator/data."""
    split: Literal["train", "heldout", "all"] = "train"
    """Which fixed split of the persona bank to sample."""
    scenarios: list[str] = ["ecommerce", "food_delivery"]
    """Scenario families to draw episodes from."""
    max_turns: int = Field(default=6, ge=1)
    """Dialogue ends after this many turns if the user has not stopped."""
    temperature: float = Field(default=0.7, ge=0)
    """Simulator sampling temperature."""
    mode: Literal["auto", "agenda", "llm"] = "auto"
    """How a simulated user turn is made (docs/simulator.md).
    "agenda": an explicit user model (goal agenda + persona policy) decides intent, emotion, satisfaction, stop and
    completed tasks deterministically from the seed; the LLM only rewords a template utterance (used as is when the
    LLM's text is unusable). Right for small models such as the CPU default SmolLM2-135M.
    "llm": the LLM role-plays the whole turn as one JSON object (utterance + metadata); for capable models.
    "auto": "llm" when serving.simulator = "external" (a capable endpoint was configured), else "agenda"."""
    max_tokens: int = Field(default=320, ge=16)
    """Completion budget of one simulator turn. mode "llm": the utterance regex is bounded so that utterance + the
    metadata JSON (up to 200 tokens) always fit, so "llm" needs >= 216; mode "agenda": bounds the utterance too."""
    utterance_chars: int = Field(default=240, ge=16)
    """mode "agenda": at most this many characters (<= tokens) in the LLM-worded utterance (also <= max_tokens)."""
    agenda_rewrite: Literal["auto"] | bool = "auto"
    """mode "agenda": let the LLM reword the template utterance (False: the template words are used, no LLM call).
    "auto": only when the simulator model is a capable one (`model.path` set or serving.simulator = "external"): on
    the small default the gates rejected 83% of its rewordings (210 of 254 turns of a 50-episode stress run were
    templated anyway) while its up to two calls a turn were half of the engine's requests (docs/throughput.md)."""
    json_retries: int = Field(default=2, ge=0)
    """mode "llm": re-asks after an unrepairable metadata JSON before the turn becomes an explicit error."""
    hard_fraction: float = Field(default=0.5, ge=0, le=1)
    """Share of low-cooperation (levels 1-2) personas in the mix (InteractCS hard/easy)."""


class JudgeConfig(Section):
    dimensions: dict[str, float] = {"quality": 0.3, "skill_compliance": 0.3, "empathy": 0.2, "diversity": 0.2}
    """Rubric dimensions and weights α_i of gopo eq 8 (normalised when used)."""
    gre_dimensions: list[str] = ["politeness", "product_appropriateness", "action_guidance"]
    """GRE dimensions (gopo §4.1.2)."""
    principles: dict[str, float] = {"logic": 0.4, "empathy": 0.3, "compliance": 0.3}
    """InteractCS principles and weights for the process reward (eq 6)."""
    temperature: float = Field(default=0.0, ge=0)
    """Judge sampling temperature."""
    max_tokens: int = Field(default=160, ge=16)
    """Completion budget of one judgement."""
    retries: int = Field(default=1, ge=0)
    """Re-asks after an unparsable judgement before it is marked failed."""
    scoring: Literal["expected", "sampled"] = "expected"
    """vLLM judges: "expected" = G-Eval style probability-weighted score over the digit tokens the judge could have
    written (continuous, informative even from a small judge); "sampled" = the numbers in its answer."""
    mode: Literal["auto", "rubric", "llm", "mixed"] = "auto"
    """Which judge scores CS replies: "rubric" = checkable evidence (gopo_online.rubric: hard constraints, SOP, task
    detectors, reference overlap, relevance, politeness/toxicity lexicons); "llm" = the judge model; "mixed" = a
    weighted mix of both. "auto" = "rubric" when the judge model is the small default (no model.path and
    serving.simulator not "external"), "llm" when a capable judge is configured. Measured on the labelled set
    (docs/judge.md, 2026-12-01): rubric AUC 0.99 / 1.00, margin 0.71 / 0.73 (ecommerce / food); SmolLM2-135M as LLM
    judge AUC 0.50 / 0.39, margin -0.001, 3.3 s a call; mixed passes only through its rubric half."""
    mixed_rubric_weight: float = Field(default=0.5, ge=0, le=1)
    """mixed mode: weight of the rubric score per dimension (the LLM's weight is 1 - this)."""
    bench_llm_items: int = Field(default=13, ge=0)
    """`bench --only judge`: labelled replies per family the llm and mixed modes score (0: rubric only)."""
    rubric_gate_factor: float = Field(default=0.25, ge=0, le=1)
    """rubric: every dimension of a reply failing a gate (empty, toxic, stuffed, copy of the user, off-topic, a broken
    hard constraint) is multiplied by this."""

    @model_validator(mode="after")
    def _weights(self) -> JudgeConfig:
        for name, weights in (("dimensions", self.dimensions), ("principles", self.principles)):
            if not weights or any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
                raise ValueError(f"judge.{name} needs non-negative weights with a positive sum, got {weights}")
        return self


class BrokerConfig(Section):
    url: str | None = None
    """Broker URL (redis://… or amqp://…); None starts the embedded Redis."""
    embedded_port: int | None = Field(default=None, ge=1, le=65535)
    """Port of the embedded Redis; None picks a free one."""
    visibility_timeout_s: float = Field(default=900.0, gt=0)
    """Redis: an unacked message is redelivered after this long (the Redis default of 1 h hides it). Keep it above
    workers.episode_timeout_s: a 2-core box took 5-8 min per episode at 8 in flight, and 300 s replayed episodes."""
    trajectory_queue: str = "gopo.trajectories"
    """Durable queue of finished trajectories."""
    dead_letter_queue: str = "gopo.dead_letter"
    """Queue for messages that failed validation, with the reason."""
    weights_exchange: str = "gopo.weights"
    """Fanout exchange announcing `weights.updated`."""
    events_exchange: str = "gopo.monitor"
    """Direct exchange of episode / learner / push events; they wait on its durable queue `<name>.controller`
    until the controller reads them (it logs them and feeds the dashboard), so a broker restart or a controller
    that is not subscribed yet loses none. (Named `gopo.monitor`: until 2026-12 `gopo.events` was a fanout.)"""
    task_queue: str = "gopo.episodes"
    """Celery queue of episode tasks."""
    connect_timeout_s: float = Field(default=10.0, gt=0)
    """Timeout for broker connections and publishes."""
    max_trajectory_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """A trajectory message larger than this is dead-lettered unread (a 6-turn episode at max_model_len 2048 is
    ~0.3 MB of JSON; the learner would otherwise parse and hold whatever a worker sends)."""


class WorkersConfig(Section):
    count: int = Field(default=1, ge=0)
    """Celery worker processes the controller starts (0 with --no-spawn)."""
    concurrency: int = Field(default=4, ge=1)
    """Episodes each worker plays at once (threads)."""
    max_in_flight: int | None = Field(default=None, ge=1)
    """Most episodes dispatched and not yet finished. None (default): count x concurrency, exactly the episodes the
    spawned workers can play at once (more wait in the broker queue and only age, fewer leave worker threads idle).
    Set it only with count = 0 (workers started elsewhere: their total concurrency); with count > 0 a value other
    than count x concurrency is an error. See `in_flight_limit`."""
    max_retries: int = Field(default=2, ge=0)
    """Retries of an episode task after a transient failure."""
    episode_timeout_s: float = Field(default=600.0, gt=0)
    """Hard limit on one episode."""
    max_restarts: int = Field(default=5, ge=0)
    """Supervision in `train`: restarts of one part (a worker, the learner, a server, the embedded broker) allowed
    within `restart_window_s`; one more death ends the run with a report."""
    restart_window_s: float = Field(default=600.0, gt=0)
    restart_backoff_s: float = Field(default=1.0, ge=0)
    """Delay before a part's first restart, doubled per further restart in the window (capped at 30 s, jittered)."""
    sync: bool = False
    """Synchronous rollout, the baseline of `bench --only async`: dispatch `learner.batch_episodes` episodes, then
    nothing until the learner has stepped on them and pushed the new version (plus one more episode for each that
    ended in an error, which the learner does not train on). Needs learner.max_staleness = 0 and push_every = 1.
    The default (False) is the asynchronous loop: episodes keep playing while the learner steps."""
    request_log: bool = True
    """Append every model request (prompt tokens, max_tokens, structured-output kind, adapter) to
    run_dir/requests/<worker>.jsonl: the profile of a run, and what `bench --only loop` replays."""

    @property
    def in_flight_limit(self) -> int:
        """The one number the controller dispatches up to: max_in_flight, else count x concurrency (count 0: one
        worker's concurrency)."""
        if self.max_in_flight is not None:
            return self.max_in_flight
        return max(1, self.count) * self.concurrency

    @model_validator(mode="after")
    def _feed(self) -> WorkersConfig:
        cap = self.count * self.concurrency
        if self.count > 0 and self.max_in_flight is not None and self.max_in_flight != cap:
            raise ValueError(
                f"workers.max_in_flight = {self.max_in_flight} disagrees with workers.count x workers.concurrency ="
                f" {self.count} x {self.concurrency} = {cap}: "
                + ("episodes would wait in the queue" if self.max_in_flight > cap else "worker threads would idle")
                + "; leave max_in_flight unset (derived) or set it only with count = 0 (workers started elsewhere)"
            )
        return self


class LearnerConfig(Section):
    finetune: Literal["full", "lora"] = "lora"
    """Full fine-tuning or LoRA adapters."""
    lora_rank: int = Field(default=8, ge=1)
    """LoRA rank (finetune = "lora")."""
    zero_stage: int = Field(default=0, ge=0, le=3)
    """DeepSpeed ZeRO stage."""
    lr: float = Field(default=5e-4, ge=0)
    """Learning rate of both policies' LoRA adapters. 5e-4: the rate `bench --only learning` measured on the CPU
    default (README, "Does training help?"). 0: the policies never move (the bench's lr-0 control)."""
    batch_episodes: int = Field(default=4, ge=1)
    """Trajectories per learner step."""
    micro_batch_turns: int = Field(default=8, ge=1)
    """Turns per forward pass (at most; `micro_batch_tokens` bounds it too)."""
    micro_batch_tokens: int = Field(default=2048, ge=1)
    """Padded tokens per forward pass (rows x longest row; one longer row goes alone): the learner's memory bound.
    A float32 forward + backward of SmolLM2-135M keeps ~3.4 MB a token (8 rows of 700 tokens: 19 GB, killed on a
    24 GiB box); 2048 tokens keep a micro-batch near 7 GB. The step's gradient is the same (micro-batches are
    weighted by their share of rows)."""
    max_staleness: int = Field(default=2, ge=0)
    """Drop trajectories produced more than this many policy versions ago (counted)."""
    push_every: int = Field(default=1, ge=1)
    """Publish weights every K learner steps."""
    checkpoint_every: int = Field(default=5, ge=1)
    """Checkpoint every K learner steps."""
    advantage: Literal["gae", "grpo", "hybrid"] = "grpo"
    """Advantage estimator: GAE with a critic, GRPO group baseline, or InteractCS hybrid (eq 5)."""
    gamma: float = Field(default=0.95, ge=0, le=1)
    """Discount factor over turns."""
    gae_lambda: float = Field(default=0.95, ge=0, le=1)
    """GAE λ."""
    clip_eps: float = Field(default=0.2, gt=0)
    """Importance-ratio clip for off-policy samples."""
    entropy_alpha: float = Field(default=0.01, ge=0)
    """α of the Expert's entropy bonus (gopo eq 7)."""
    lambda_p: float = Field(default=1.0, ge=0)
    """λp, policy-gradient weight of the CS loss (gopo eq 9a)."""
    lambda_s: float = Field(default=0.1, ge=0)
    """λs, skill-compliance weight of the CS loss (gopo eq 9a)."""
    lambda_d: float = Field(default=0.01, ge=0)
    """λd, diversity (entropy) weight of the CS loss (gopo eq 9a)."""
    kl_coef: float = Field(default=0.05, ge=0)
    """Initial KL coefficient β to the reference policy (step-by-step eq 5)."""
    kl_target: float | None = Field(default=0.1, gt=0)
    """Target KL for the adaptive β; None keeps β fixed."""
    grad_clip: float = Field(default=1.0, gt=0)
    """Gradient-norm clip."""
    use_cost_penalty: bool = True
    """Subtract λ·cost (PID-Lagrangian, InteractCS eq 7-8) from the CS advantage."""
    kl_rate: float = Field(default=0.2, gt=0, le=1)
    """K_β, update rate of the adaptive β per learner step: β ← β(1 + K_β e), e = clip(KL/target − 1, ±0.2)
    (step-by-step eq 6-7, which uses 0.2)."""
    grammar_mask: bool = True
    """Score constrained completions over the tokens their grammar admitted (the set vLLM sampled from)."""
    group_size: int = Field(default=4, ge=1)
    """GRPO group size G: the controller dispatches G rollouts of one (persona, scenario instance, simulator
    seed) with one group id; advantages are normalised within a group (InteractCS uses 4). 1 = no groups."""


class RewardsConfig(Section):
    w_expert_start: float = Field(default=0.3, ge=0)
    """w^E at turn 1 (gopo eq 10)."""
    w_expert_end: float = Field(default=0.7, ge=0)
    """w^E reached at turn `w_expert_ramp_turns` and kept after."""
    w_expert_ramp_turns: int = Field(default=6, ge=1)
    """Turns over which w^E rises from start to end."""
    w_expert_schedule: Literal["linear", "exponential", "constant"] = "linear"
    """Shape of the w^E ramp."""
    w_cs_floor: float = Field(default=0.2, gt=0)
    """w^A is 1 - w^E but never below this floor (gopo: w^A strictly positive)."""
    tse_weights: list[float] = [0.4, 0.3, 0.3]
    """ω_1..3 of TSE (gopo eq 11)."""
    tse_gamma: float = Field(default=0.9, gt=0, le=1)
    """Turn decay γ of TSE."""
    cost_budget: float = Field(default=0.3, ge=0)
    """Target cost rate (e.g. vouchers per episode) for the PID-Lagrangian controller."""
    pid_kp: float = Field(default=1.0, ge=0)
    """Proportional gain (InteractCS eq 8)."""
    pid_ki: float = Field(default=0.1, ge=0)
    """Integral gain."""
    pid_kd: float = Field(default=0.0, ge=0)
    """Derivative gain."""
    pid_integral_max: float = Field(default=10.0, gt=0)
    """Anti-windup bound on the integral term."""
    outcome_weight: float = Field(default=1.0, ge=0)
    """Weight of the normalised outcome (final satisfaction) in the hybrid advantage (InteractCS eq 5)."""
    process_weight: float = Field(default=0.5, ge=0)
    """Weight of the process reward in the hybrid advantage."""
    skill_distance: bool = True
    """Compute the skill-compliance distance d(a^A, a^E) of gopo eq 9c for every turn (all-MiniLM-L6-v2 on the
    rollout worker); False leaves it unset and the CS loss's L_s term is 0."""

    @model_validator(mode="after")
    def _check(self) -> RewardsConfig:
        if len(self.tse_weights) != 3 or any(w < 0 for w in self.tse_weights):
            raise ValueError(f"rewards.tse_weights needs 3 non-negative weights, got {self.tse_weights}")
        if self.w_expert_end < self.w_expert_start:
            raise ValueError("rewards.w_expert_end must be >= w_expert_start: w^E increases over turns (gopo eq 10)")
        return self


class DashboardConfig(Section):
    enabled: bool = True
    """Show the live rich console (off when stdout is not a terminal)."""
    refresh_hz: float = Field(default=2.0, gt=0)
    """Console refresh rate."""
    jsonl: bool = True
    """Write metrics to run_dir/metrics.jsonl."""
    tensorboard: bool = True
    """Write TensorBoard event files to run_dir/tb."""
    excerpt_turns: int = Field(default=3, ge=0)
    """Turns of the latest dialogue shown."""


class GopoConfig(Section):
    """Root config. Sections mirror the processes that read them."""

    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    serving: ServingConfig = ServingConfig()
    agents: AgentsConfig = AgentsConfig()
    simulator: SimulatorConfig = SimulatorConfig()
    judge: JudgeConfig = JudgeConfig()
    broker: BrokerConfig = BrokerConfig()
    workers: WorkersConfig = WorkersConfig()
    learner: LearnerConfig = LearnerConfig()
    rewards: RewardsConfig = RewardsConfig()
    dashboard: DashboardConfig = DashboardConfig()

    @property
    def small_simulator_model(self) -> bool:
        """The simulator and judge run on the small default model (no `model.path`, no external endpoint): what the
        "auto" settings of `judge.mode` and `simulator.agenda_rewrite` decide by."""
        return self.model.path is None and self.serving.simulator != "external"

    @model_validator(mode="after")
    def _consistent(self) -> GopoConfig:
        if self.serving.weight_transport != "lora":
            raise ValueError(
                f"serving.weight_transport = {self.serving.weight_transport!r} cannot run in the training loop: the "
                "Expert and CS policies share one vLLM server as two LoRA adapters, and a full reload would replace "
                "both of them (and the simulator's base model); use 'lora' (full reload is benchmark-only: "
                "gopo-online bench --only push)"
            )
        if self.serving.weight_transport == "lora" and self.learner.finetune == "full":
            raise ValueError("serving.weight_transport = 'lora' needs learner.finetune = 'lora' (no adapter to push)")
        if self.workers.sync and (self.learner.max_staleness != 0 or self.learner.push_every != 1):
            raise ValueError(
                "workers.sync = true (dispatch waits for the learner) needs learner.max_staleness = 0 and "
                f"learner.push_every = 1 (got {self.learner.max_staleness} and {self.learner.push_every})"
            )
        if self.learner.finetune == "lora" and self.learner.lora_rank > self.serving.max_lora_rank:
            raise ValueError(
                f"learner.lora_rank = {self.learner.lora_rank} exceeds "
                f"serving.max_lora_rank = {self.serving.max_lora_rank}"
            )
        return self


class ConfigError(InputError):
    """A config file or override is wrong; the message names the key and, for typos, the close match."""


def _valid_keys(model: type[BaseModel], loc: tuple[str | int, ...]) -> list[str]:
    """Field names of the (sub)model at `loc` (the parent of the bad key)."""
    cur: Any = model
    for part in loc:
        field = cur.model_fields.get(part) if isinstance(part, str) and hasattr(cur, "model_fields") else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        cur = field.annotation
    return list(cur.model_fields) if hasattr(cur, "model_fields") else []


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        if e["type"] == "extra_forbidden":
            valid = _valid_keys(GopoConfig, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1)
            hint = f" (did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?)" if close else ""
            lines.append(f"  unknown key '{key}'{hint}")
        else:
            lines.append(f"  {key}: {e['msg']} (got {short_repr(e.get('input'))})")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], value). The value is read as TOML, else kept as a string."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like section.key=value")
    key, raw = item.split("=", 1)
    parts = [p.strip() for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError(f"override '{item}' has an empty key part")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"override '{item[:80]}': value not usable ({type(e).__name__}: {str(e)[:120]})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        parts, value = parse_override(item)
        cur = data
        for p in parts[:-1]:
            nxt = cur.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{item}': '{p}' is a value, not a section")
            cur = nxt
        cur[parts[-1]] = value
    return data


def load_config(path: Path | str | None = None, overrides: list[str] | None = None) -> GopoConfig:
    """Load the TOML file (default: the shipped default.toml) and apply `key=value` overrides."""
    path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        kind = "a binary file" if b"\x00" in raw[:65536] else "not UTF-8 text"
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: {kind}, not a TOML config (byte 0x{raw[e.start]:02x} at offset {e.start}, line {line})"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except (ValueError, RecursionError) as e:  # an integer past 4300 digits; arrays nested past the parser's depth
        raise ConfigError(f"{path}: not usable TOML ({type(e).__name__}: {str(e)[:120]})") from None
    data = apply_overrides(data, overrides or [])
    try:
        return GopoConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, str(path) + (" + overrides" if overrides else ""))) from None


def missing_paths(cfg: GopoConfig) -> list[str]:
    """The paths a config names that do not exist on this machine (what `config validate` reports)."""
    problems = []
    model_path = cfg.model.path.expanduser() if cfg.model.path is not None else None
    if model_path is not None and not (model_path / "config.json").is_file():
        what = "is not a Hugging Face model folder (no config.json)" if model_path.is_dir() else "does not exist"
        problems.append(f"model.path = '{cfg.model.path}' {what}")
    if cfg.simulator.persona_file is not None and not cfg.simulator.persona_file.is_file():
        problems.append(f"simulator.persona_file = '{cfg.simulator.persona_file}' does not exist")
    return problems


def dump_config(cfg: GopoConfig) -> dict[str, Any]:
    """JSON-safe dict of the whole config (what a run records next to its metrics)."""
    return cfg.model_dump(mode="json")
