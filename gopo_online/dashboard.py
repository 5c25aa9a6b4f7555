"""The live console of a training job, and `gopo-online dashboard` (attach to a job through its metrics file).

Everything the console shows is folded from events, the same events `MetricsLogger` writes to
`run_dir/metrics.jsonl` (`gopo_online.events.Event.record`: `{"time", "step", "kind", "metrics", "payload"?}`). So
the controller's live console and a console attached later from the file show the same numbers. The kinds and the
metric keys read are defined once, in gopo_online.events (`Key`); producers emit those names, nothing renames them.

`rich` is imported inside the functions that render, so importing this module stays cheap.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gopo_online.events import Key

if TYPE_CHECKING:
    from gopo_online.config import DashboardConfig, GopoConfig
    from gopo_online.types import Trajectory

__all__ = ["Dashboard", "DashboardState", "attach", "episode_event", "sparkline"]

REWARD_ROWS: tuple[tuple[str, str], ...] = (
    ("r_expert (ESNDCG)", "reward/esndcg"),
    ("r_cs", "reward/cs"),
    ("joint", "reward/joint"),
    ("process", "reward/process"),
    ("compliance", "reward/compliance"),
    ("TSE", "episode/tse"),
    ("satisfaction", "episode/satisfaction"),
    ("cost rate", "episode/cost_rate"),
)
"""Label and key of each episode quantity shown with now / start / trend (in this order)."""
LOSS_KEYS = ("loss/expert", "loss/cs", "loss/kl")
SPARK_CHARS = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 24
MIN_RATE_WINDOW_S = 10.0
"""Shortest window a rate is computed over."""
MAX_GROUP_ROWS = 12


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return math.fsum(xs) / len(xs) if xs else math.nan


def sparkline(values: Sequence[float], width: int = 20) -> str:
    """Values resampled to at most `width` bucket means, drawn with block characters (min..max of the buckets)."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return ""
    n = min(width, len(vals))
    buckets = [_mean(vals[i * len(vals) // n : (i + 1) * len(vals) // n]) for i in range(n)]
    lo, hi = min(buckets), max(buckets)
    if hi - lo < 1e-12:
        return SPARK_CHARS[len(SPARK_CHARS) // 2 - 1] * n
    top = len(SPARK_CHARS) - 1
    return "".join(SPARK_CHARS[round((b - lo) / (hi - lo) * top)] for b in buckets)


class _History:
    """A bounded history of a series for sparklines: past `cap` points, adjacent pairs merge (mean of means).

    Memory stays O(cap) over a run of any length, and the series keeps its shape from start to now.
    """

    def __init__(self, cap: int = 512):
        self.cap = cap
        self.points: list[float] = []
        self._pending: list[float] = []
        self._bucket = 1  # raw values per point

    def add(self, v: float) -> None:
        self._pending.append(v)
        if len(self._pending) < self._bucket:
            return
        self.points.append(_mean(self._pending))
        self._pending = []
        if len(self.points) > self.cap:
            self.points = [_mean(self.points[i : i + 2]) for i in range(0, len(self.points), 2)]
            self._bucket *= 2

    def values(self) -> list[float]:
        return self.points + ([_mean(self._pending)] if self._pending else [])


@dataclass
class _Series:
    """One episode quantity: the first `trend_n` values (start), the last `recent` (now), and the history."""

    recent: deque[float]
    start: list[float] = field(default_factory=list)
    history: _History = field(default_factory=_History)
    count: int = 0

    def add(self, v: float, trend_n: int) -> None:
        self.recent.append(v)
        if len(self.start) < trend_n:
            self.start.append(v)
        self.history.add(v)
        self.count += 1


@dataclass
class _Group:
    episodes: int = 0
    failures: int = 0
    tse: deque[float] = field(default_factory=deque)
    satisfaction: deque[float] = field(default_factory=deque)
    finish: deque[float] = field(default_factory=deque)
    cost: deque[float] = field(default_factory=deque)


class DashboardState:
    """Rolling aggregates folded from events. Not thread-safe by itself; `Dashboard` guards it with a lock.

    window_s: the window of the rate figures (episodes/min, tokens/s); until the run is that old, the rate uses
    the time since `start_time` (at least `MIN_RATE_WINDOW_S`) so the first minute is not under-reported.
    recent: episodes in the "now" mean of each reward row; trend_n: episodes in its "start" mean.
    group_window: episodes per persona group in the group table's means (counts are totals).
    """

    def __init__(
        self,
        *,
        window_s: float = 60.0,
        recent: int = 50,
        trend_n: int = 20,
        group_window: int = 200,
        max_errors: int = 5,
        start_time: float | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.window_s = window_s
        self.recent = recent
        self.trend_n = trend_n
        self.group_window = group_window
        self.clock = clock
        self.start_time = start_time
        self.last_time: float | None = None
        self.episodes = 0
        self.failures = 0
        self.events = 0
        self._ep_times: deque[tuple[float, float]] = deque()  # (time, tokens) within the rate window
        self.tokens_total = 0.0
        self.series: dict[str, _Series] = {}
        self.groups: dict[str, _Group] = {}
        self.excerpt: dict[str, Any] | None = None
        self.errors: deque[tuple[float, str, str]] = deque(maxlen=max_errors)
        self.errors_total = 0
        self.restarts = 0
        # learner
        self.learner_step: int | None = None
        self.learner_steps = 0
        self.step_time: float | None = None
        self._step_times: deque[float] = deque(maxlen=recent)
        self.losses: dict[str, float] = {}
        self.lam: float | None = None
        self.trained_version: int | None = None
        self.stale_dropped: float | None = None
        # system / push
        self.policy_version: int | None = None
        self.queue_depth: float | None = None
        self.in_flight: float | None = None
        self.sys_tokens_per_s: float | None = None
        self.pushes = 0
        self.push_latency: float | None = None
        self.server_tokens_per_s: float | None = None
        self.prefix_cache_hit_rate: float | None = None
        """The policy server's own generation throughput (its /metrics), sampled by the controller."""
        self.restarts = 0

    # ---- folding -----------------------------------------------------------------------------------------------
    def fold(self, event: Mapping[str, Any]) -> None:
        """Fold one event (the dict `MetricsLogger.log` writes). Unknown kinds and keys are ignored."""
        t = self.clock() if event.get("time") is None else float(event["time"])
        kind = event.get("kind")
        m: Mapping[str, float] = event.get("metrics") or {}
        payload: Mapping[str, Any] = event.get("payload") or {}
        self.events += 1
        self.start_time = t if self.start_time is None else min(self.start_time, t)
        self.last_time = t if self.last_time is None else max(self.last_time, t)
        for key in (Key.POLICY_VERSION, Key.LEARNER_VERSION):
            if key in m:
                v = int(m[key])
                self.policy_version = v if self.policy_version is None else max(self.policy_version, v)
        if Key.STALE_DROPPED in m:
            self.stale_dropped = m[Key.STALE_DROPPED]
        if kind == "episode":
            self._fold_episode(t, m, payload)
        elif kind == "learner":
            self._fold_learner(event, m)
        elif kind == "push":
            self.pushes += 1
            if Key.PUSH_LATENCY_S in m:
                self.push_latency = m[Key.PUSH_LATENCY_S]
        elif kind == "system":
            self.queue_depth = m.get(Key.QUEUE_DEPTH, self.queue_depth)
            self.in_flight = m.get(Key.IN_FLIGHT, self.in_flight)
            self.sys_tokens_per_s = m.get(Key.TOKENS_PER_S, self.sys_tokens_per_s)
            self.server_tokens_per_s = m.get(Key.SERVER_TOKENS_PER_S, self.server_tokens_per_s)
            self.prefix_cache_hit_rate = m.get(Key.PREFIX_CACHE_HIT_RATE, self.prefix_cache_hit_rate)
        elif kind == "restart":  # a supervised part died and was restarted (workers/supervisor.py)
            self.restarts = max(self.restarts + 1, int(m.get(Key.RESTARTS, 0)))
            who = payload.get("component") or payload.get("part") or "?"
            why = payload.get("reason") or payload.get("error") or "restarted"
            self._error(t, f"restart {who}", f"{who} restarted: {why}")
        elif kind == "error":
            self._error(t, str(payload.get("source", "")), str(payload.get("error", "")) or "(no message)")

    def _fold_episode(self, t: float, m: Mapping[str, float], payload: Mapping[str, Any]) -> None:
        self.episodes += 1
        tokens = float(m.get("episode/tokens", 0.0))
        self.tokens_total += tokens
        self._ep_times.append((t, tokens))
        failed = payload.get("status") == "error" or m.get("episode/error_rate", 0.0) >= 0.5
        g = self.groups.setdefault(str(payload.get("persona_group") or "-"), self._new_group())
        g.episodes += 1
        if failed:
            self.failures += 1
            g.failures += 1
            self._error(t, f"episode {payload.get('episode_id', '?')}", str(payload.get("error") or "failed"))
            return
        for dq, key in (
            (g.tse, "episode/tse"),
            (g.satisfaction, "episode/satisfaction"),
            (g.finish, "episode/finish_rate"),
            (g.cost, "episode/cost_rate"),
        ):
            if key in m:
                dq.append(m[key])
        for _, key in REWARD_ROWS:
            v = m.get(key)
            if v is None and key == "reward/compliance":
                v = m.get("episode/compliance")  # older producers: the turn compliance score is the same number
            if v is not None:
                self.series.setdefault(key, _Series(deque(maxlen=self.recent))).add(v, self.trend_n)
        if payload.get("excerpt"):
            self.excerpt = {
                "episode_id": payload.get("episode_id", "?"),
                "persona_group": payload.get("persona_group", ""),
                "policy_version": m.get("episode/policy_version"),
                "turns": list(payload["excerpt"]),
            }

    def _new_group(self) -> _Group:
        w = self.group_window
        return _Group(tse=deque(maxlen=w), satisfaction=deque(maxlen=w), finish=deque(maxlen=w), cost=deque(maxlen=w))

    def _fold_learner(self, event: Mapping[str, Any], m: Mapping[str, float]) -> None:
        self.learner_steps += 1
        if event.get("step") is not None:
            self.learner_step = int(event["step"])
        if Key.STEP_TIME_S in m:
            self.step_time = m[Key.STEP_TIME_S]
            self._step_times.append(m[Key.STEP_TIME_S])
        for k, v in m.items():
            if k.startswith("loss/"):
                self.losses[k] = v
        self.lam = m.get(Key.COST_LAMBDA, self.lam)
        if Key.TRAINED_VERSION in m:
            self.trained_version = int(m[Key.TRAINED_VERSION])

    def _error(self, t: float, source: str, text: str) -> None:
        self.errors_total += 1
        self.errors.append((t, source, text))

    # ---- derived figures ---------------------------------------------------------------------------------------
    def now(self) -> float:
        return self.clock()

    def _window(self, now: float) -> tuple[float, float]:
        """(window start, window length in s), the length shortened to the run's age while it is young."""
        age = now - self.start_time if self.start_time is not None else 0.0
        # a floor keeps one early episode from reading as thousands per minute
        length = min(self.window_s, max(age, min(MIN_RATE_WINDOW_S, self.window_s)))
        return now - length, length

    def _in_window(self, now: float) -> list[tuple[float, float]]:
        lo, _ = self._window(now)
        while self._ep_times and self._ep_times[0][0] <= now - self.window_s:
            self._ep_times.popleft()  # older than any window we will ask about again
        return [(t, k) for t, k in self._ep_times if lo < t <= now]

    def episodes_per_min(self, now: float | None = None) -> float:
        """Episodes finished in the last `window_s` seconds, per minute."""
        now = self.now() if now is None else now
        _, length = self._window(now)
        return len(self._in_window(now)) * 60.0 / length

    def avg_episodes_per_min(self) -> float:
        """Episodes per minute from the first to the last event (what a finished run averaged)."""
        if self.start_time is None or self.last_time is None or self.last_time <= self.start_time:
            return math.nan
        return self.episodes * 60.0 / (self.last_time - self.start_time)

    def tokens_per_s(self, now: float | None = None) -> float:
        """The system's own sample when it reports one, else sampled tokens of episodes in the window per second."""
        if self.sys_tokens_per_s is not None:
            return self.sys_tokens_per_s
        now = self.now() if now is None else now
        _, length = self._window(now)
        return math.fsum(k for _, k in self._in_window(now)) / length

    @property
    def version_lag(self) -> int | None:
        if self.policy_version is None or self.trained_version is None:
            return None
        return self.policy_version - self.trained_version

    @property
    def mean_step_time(self) -> float:
        return _mean(self._step_times)

    def now_mean(self, key: str) -> float:
        s = self.series.get(key)
        return _mean(s.recent) if s else math.nan

    def start_mean(self, key: str) -> float:
        s = self.series.get(key)
        return _mean(s.start) if s else math.nan

    def group_rows(self) -> list[dict[str, Any]]:
        """One dict per persona group, sorted by name: episodes, failures, and window means (NaN when none)."""
        return [
            {
                "group": name,
                "episodes": g.episodes,
                "failures": g.failures,
                "tse": _mean(g.tse),
                "satisfaction": _mean(g.satisfaction),
                "finish_rate": _mean(g.finish),
                "cost_rate": _mean(g.cost),
            }
            for name, g in sorted(self.groups.items())
        ]

    def summary_line(self, now: float | None = None) -> str:
        """One line for logs when there is no terminal to draw on."""
        now = self.now() if now is None else now
        parts = [
            f"up={_dur(now - self.start_time) if self.start_time is not None else '-'}",
            f"episodes={self.episodes}",
            f"eps/min={_f(self.episodes_per_min(now), 1)}",
            f"tok/s={_f(self.tokens_per_s(now), 0)}",
            f"server_tok/s={_f(self.server_tokens_per_s, 0)}",
            f"queue={_f(self.queue_depth, 0)}",
            f"in_flight={_f(self.in_flight, 0)}",
            f"version={_f(self.policy_version, 0)}",
            f"lag={_f(self.version_lag, 0)}",
            f"step={_f(self.learner_step, 0)}",
            f"step_s={_f(self.step_time, 2)}",
        ]
        parts += [f"{k}={_f(self.losses.get(k), 3)}" for k in LOSS_KEYS if k in self.losses]
        parts += [f"{k}={_f(self.now_mean(k), 3)}" for _, k in REWARD_ROWS if k in self.series]
        parts += [f"lambda={_f(self.lam, 3)}", f"errors={self.errors_total}", f"restarts={self.restarts}"]
        return " ".join(parts)


def _f(v: float | int | None, digits: int = 3) -> str:
    """A number for display; '-' for missing or NaN."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:,.{digits}f}" if digits else f"{v:,.0f}"


def _dur(s: float) -> str:
    s = max(int(s), 0)
    h, rem = divmod(s, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"


def _clip(text: str, n: int) -> str:
    text = " ".join(str(text).split())  # one line: newlines in a reply would break the panel's layout
    return text if len(text) <= n else text[: n - 1] + "…"


# ---- rendering ---------------------------------------------------------------------------------------------------
def render_state(state: DashboardState, run_name: str, excerpt_turns: int = 3, now: float | None = None) -> Any:
    """The dashboard as a rich renderable (about 40 lines at 140 columns)."""
    from rich import box
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    now = state.now() if now is None else now
    lag = state.version_lag

    title = Text.assemble(
        ("gopo-online", "bold cyan"),
        f" · {run_name} · up {_dur(now - state.start_time) if state.start_time is not None else '-'}",
        " · policy ",
        (f"v{_f(state.policy_version, 0)}", "bold"),
        " · lag ",
        (_f(lag, 0), "bold red" if lag is not None and lag > 1 else "bold"),
        f" · {state.episodes} episodes · {state.learner_steps} learner steps · {state.errors_total} errors"
        + (f" · {state.restarts} restarts" if state.restarts else ""),
    )
    if state.last_time is not None and now - state.last_time > 30:
        title.append(f" · last event {_dur(now - state.last_time)} ago", style="yellow")

    def kv(rows: list[tuple[str, str]]) -> Table:
        t = Table.grid(padding=(0, 1), expand=True)
        t.add_column(style="dim", no_wrap=True)
        t.add_column(justify="right", no_wrap=True)
        for k, v in rows:
            t.add_row(k, v)
        return t

    throughput = kv(
        [
            ("episodes/min", _f(state.episodes_per_min(now), 1)),
            ("  run average", _f(state.avg_episodes_per_min(), 1)),
            ("tokens/s", _f(state.tokens_per_s(now), 0)),
            ("server tok/s", _f(state.server_tokens_per_s, 0)),
            ("prefix cache hit", "-" if state.prefix_cache_hit_rate is None else f"{state.prefix_cache_hit_rate:.0%}"),
            ("queue depth", _f(state.queue_depth, 0)),
            ("in-flight", _f(state.in_flight, 0)),
            ("episodes", f"{state.episodes:,}"),
            ("failed", f"{state.failures:,}"),
            ("restarts", f"{state.restarts:,}"),
            ("stale dropped", _f(state.stale_dropped, 0)),
            ("pushes", f"{state.pushes:,}"),
            ("push latency s", _f(state.push_latency, 2)),
        ]
    )
    learner = kv(
        [
            ("step", _f(state.learner_step, 0)),
            ("step time s", _f(state.step_time, 2)),
            ("  mean", _f(state.mean_step_time, 2)),
            ("loss expert", _f(state.losses.get("loss/expert"), 4)),
            ("loss cs", _f(state.losses.get("loss/cs"), 4)),
            ("loss kl", _f(state.losses.get("loss/kl"), 4)),
            ("λ (cost)", _f(state.lam, 3)),
            ("cost rate", _f(state.now_mean("episode/cost_rate"), 3)),
            ("policy version", _f(state.policy_version, 0)),
            ("version lag", _f(lag, 0)),
        ]
    )

    rewards = Table(box=box.SIMPLE_HEAD, expand=True, padding=(0, 1), pad_edge=False, show_edge=False)
    rewards.add_column("episode means", no_wrap=True)
    rewards.add_column("now", justify="right", no_wrap=True)
    rewards.add_column("start", justify="right", no_wrap=True)
    rewards.add_column("Δ", justify="right", no_wrap=True, min_width=7)
    rewards.add_column("trend", no_wrap=True, width=SPARK_WIDTH)
    for label, key in REWARD_ROWS:
        now_v, start_v = state.now_mean(key), state.start_mean(key)
        delta = now_v - start_v
        if not math.isfinite(delta):
            mark = Text("")
        else:
            # cost is the one row where down is good
            good = delta < 0 if key == "episode/cost_rate" else delta > 0
            arrow = "▲" if delta > 0 else "▼" if delta < 0 else "="
            mark = Text(f"{arrow}{abs(delta):.3f}", style="" if arrow == "=" else ("green" if good else "red"))
        s = state.series.get(key)
        rewards.add_row(
            label, _f(now_v), _f(start_v), mark, Text(sparkline(s.history.values(), SPARK_WIDTH) if s else "")
        )

    # fixed widths for the two key/value panels: the rewards table gets every column the terminal has left
    top = Table.grid(expand=True, padding=(0, 1))
    top.add_column(width=29)
    top.add_column(width=29)
    top.add_column(ratio=1)
    top.add_row(
        Panel(throughput, title="throughput", border_style="cyan"),
        Panel(learner, title="learner", border_style="magenta"),
        Panel(rewards, title="rewards & outcomes", border_style="green"),
    )

    # the box's space separator plus a left pad: two columns between cells, so seven columns fit in ~60
    groups = Table(box=box.SIMPLE_HEAD, expand=True, padding=(0, 0, 0, 1), pad_edge=False, show_edge=False)
    for col, justify in (
        ("group", "left"),
        ("eps", "right"),
        ("TSE", "right"),
        ("satisf", "right"),
        ("finish", "right"),
        ("cost", "right"),
        ("failed", "right"),
    ):
        groups.add_column(col, justify=justify, no_wrap=True)
    rows = state.group_rows()
    if len(rows) > MAX_GROUP_ROWS:  # keep the console within a 45-line terminal: the largest groups are shown
        rows = sorted(sorted(rows, key=lambda r: -r["episodes"])[:MAX_GROUP_ROWS], key=lambda r: r["group"])
    for r in rows:
        groups.add_row(
            _clip(r["group"], 16),
            f"{r['episodes']:,}",
            _f(r["tse"]),
            _f(r["satisfaction"], 2),
            _f(r["finish_rate"], 2),
            _f(r["cost_rate"], 2),
            Text(f"{r['failures']:,}", style="red" if r["failures"] else ""),
        )
    if len(state.groups) > MAX_GROUP_ROWS:
        groups.add_row(Text(f"+{len(state.groups) - MAX_GROUP_ROWS} more", style="dim"))

    dialogue = Table.grid(padding=(0, 1), expand=True)
    dialogue.add_column(style="dim", no_wrap=True, width=6)
    dialogue.add_column(ratio=1, overflow="ellipsis")
    ex = state.excerpt
    ex_title = "latest dialogue"
    if ex is None:
        dialogue.add_row("", Text("no episode yet", style="dim"))
    else:
        ex_title += f" · {ex['episode_id']}" + (f" · {ex['persona_group']}" if ex["persona_group"] else "")
        if ex.get("policy_version") is not None:
            ex_title += f" · v{int(ex['policy_version'])}"
        for turn in ex["turns"][-excerpt_turns:] if excerpt_turns else []:
            t = turn.get("t", "?")
            # user on one line, reply on at most about two: the whole console must fit a 45-line terminal
            dialogue.add_row(f"{t} user", Text(_clip(turn.get("user", ""), 200), no_wrap=True, overflow="ellipsis"))
            skills = ", ".join(turn.get("skills", ()))
            r = turn.get("r")
            skill_line = Text(_clip(skills, 90), style="yellow")
            if r is not None:
                skill_line.append(f"  R_t={r:.2f}", style="dim")
            dialogue.add_row("  skl", skill_line)
            reply = Text(f"[{turn.get('action', '?')}] ", style="bold blue")
            reply.append(_clip(turn.get("reply", ""), 140))
            dialogue.add_row("  cs", reply)

    middle = Table.grid(expand=True, padding=(0, 1))
    middle.add_column(ratio=50)
    middle.add_column(ratio=58)
    middle.add_row(
        Panel(groups, title="persona groups", border_style="blue"),
        Panel(dialogue, title=_clip(ex_title, 70), border_style="yellow"),
    )

    errs = Table.grid(padding=(0, 1), expand=True)
    errs.add_column(no_wrap=True, style="dim")
    errs.add_column(no_wrap=True, style="red")
    errs.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
    if not state.errors:
        errs.add_row("", "", Text("none", style="dim"))
    for t, source, text in reversed(state.errors):
        errs.add_row(time.strftime("%H:%M:%S", time.localtime(t)), _clip(source, 30), _clip(text, 200))
    errors = Panel(errs, title=f"recent errors ({state.errors_total} total)", border_style="red")

    return Group(title, top, middle, errors)


class Dashboard:
    """The controller's live console. `update` is thread-safe; `start`/`stop` run a rich `Live` on a terminal,
    else (not a terminal, or `cfg.enabled` false) print `DashboardState.summary_line` every `log_every_s`.
    """

    def __init__(
        self,
        cfg: DashboardConfig,
        run_name: str,
        *,
        console: Any = None,
        log_every_s: float = 30.0,
        state: DashboardState | None = None,
    ):
        self.cfg = cfg
        self.run_name = run_name
        self.state = state or DashboardState()
        self.log_every_s = log_every_s
        self._lock = threading.RLock()
        self._console = console
        self._live: Any = None
        self._stop = threading.Event()
        self._logger_thread: threading.Thread | None = None

    @property
    def console(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console()
        return self._console

    @property
    def live(self) -> bool:
        """Whether `start` draws a live console (a terminal and the dashboard enabled)."""
        return bool(self.cfg.enabled and self.console.is_terminal)

    def update(
        self,
        event_kind: str,
        metrics: Mapping[str, float],
        payload: Mapping[str, Any] | None = None,
        *,
        step: int | None = None,
        time_s: float | None = None,
    ) -> None:
        """Fold one event (same fields as a `MetricsLogger.log` call). Safe from any thread."""
        self.feed(
            {
                "time": time.time() if time_s is None else time_s,
                "step": step,
                "kind": event_kind,
                "metrics": dict(metrics),
                "payload": dict(payload or {}),
            }
        )

    def feed(self, event: Mapping[str, Any]) -> None:
        """Fold an event as read back from metrics.jsonl."""
        with self._lock:
            self.state.fold(event)

    def render(self) -> Any:
        with self._lock:
            return render_state(self.state, self.run_name, self.cfg.excerpt_turns)

    def snapshot_text(self, width: int = 140) -> str:
        """The dashboard as plain text (no colour codes), e.g. to paste in a report."""
        import io

        from rich.console import Console

        console = Console(record=True, width=width, file=io.StringIO(), color_system=None, force_terminal=False)
        console.print(self.render())
        return console.export_text(styles=False)

    def summary_line(self) -> str:
        with self._lock:
            return f"[{self.run_name}] {self.state.summary_line()}"

    def start(self) -> None:
        with self._lock:
            if self.state.start_time is None:
                self.state.start_time = self.state.now()
        if self._live is not None or self._logger_thread is not None:
            return
        self._stop.clear()
        if self.live:
            from rich.live import Live

            self._live = Live(
                get_renderable=self.render,
                console=self.console,
                refresh_per_second=self.cfg.refresh_hz,
                transient=False,
                redirect_stdout=True,
                redirect_stderr=True,
            )
            self._live.start()
        else:
            self._logger_thread = threading.Thread(target=self._log_loop, name="dashboard-log", daemon=True)
            self._logger_thread.start()

    def _log_loop(self) -> None:
        while not self._stop.wait(self.log_every_s):
            print(self.summary_line(), flush=True)

    def stop(self) -> None:
        """Stop drawing; the last frame stays on screen (or a last summary line is printed)."""
        self._stop.set()
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self._logger_thread is not None:
            self._logger_thread.join(timeout=5)
            self._logger_thread = None
            print(self.summary_line(), flush=True)

    def __enter__(self) -> Dashboard:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def episode_event(
    traj: Trajectory,
    tse_weights: Sequence[float],
    tse_gamma: float,
    excerpt_turns: int = 3,
) -> tuple[dict[str, float], dict[str, Any]]:
    """(metrics, payload) of one finished episode, for `MetricsLogger.log(..., kind="episode")` and
    `Dashboard.update("episode", ...)`. Pass `cfg.rewards.tse_weights`, `cfg.rewards.tse_gamma` and
    `cfg.dashboard.excerpt_turns`.
    """
    from gopo_online.metrics import summarize

    metrics = summarize([traj], tse_weights, tse_gamma)
    rewarded = [u.rewards for u in traj.turns if u.rewards is not None]
    if rewarded:
        metrics["reward/compliance"] = _mean(r.compliance for r in rewarded)
    metrics["episode/tokens"] = float(
        sum(len(g.completion_token_ids) for u in traj.turns for g in (u.expert_gen, u.cs_gen) if g is not None)
    )
    # simulator quality gates (issue 8): flagged episodes should be excluded by a learner; counts per run
    metrics["episode/sim_flagged"] = float(traj.sim_flagged)
    metrics["episode/sim_regenerated"] = float(traj.sim_regenerated)
    metrics["episode/sim_template_turns"] = float(sum(u.user_meta.source == "template" for u in traj.turns))
    if traj.min_policy_version is not None:
        metrics["episode/policy_version"] = float(traj.min_policy_version)
        metrics["episode/policy_version_max"] = float(traj.policy_versions[-1])
    payload: dict[str, Any] = {
        "episode_id": traj.episode_id,
        "persona_group": traj.persona_group,
        "scenario_id": traj.scenario_id,
        "status": traj.status,
    }
    if traj.error:
        payload["error"] = traj.error
    if traj.sim_flags:
        payload["sim_flags"] = list(traj.sim_flags)
    if excerpt_turns and traj.turns:
        payload["excerpt"] = [
            {
                "t": u.index,
                "user": u.user_utterance,
                "skills": list(u.expert_skills),
                "reply": u.cs_reply,
                "action": u.cs_action,
                **({"r": u.rewards.joint} if u.rewards is not None else {}),
            }
            for u in traj.turns[-excerpt_turns:]
        ]
    return metrics, payload


def attach(
    cfg: GopoConfig,
    run_dir: str | Path | None = None,
    *,
    wait_s: float = 60.0,
    max_iterations: int | None = None,
    console: Any = None,
    log_every_s: float = 30.0,
) -> Dashboard:
    """Follow `run_dir/metrics.jsonl` from its start (so every aggregate is complete) and show the dashboard
    until Ctrl-C, or for `max_iterations` polls (tests). Waits up to `wait_s` for the file to appear, then exits
    with a message. Returns the dashboard (its state holds everything read).
    """
    from gopo_online.metrics_log import METRICS_FILE, read_metrics

    run_dir = Path(run_dir) if run_dir is not None else cfg.run.run_dir
    path = run_dir / METRICS_FILE
    poll_s = 1.0 / cfg.dashboard.refresh_hz
    dash = Dashboard(cfg.dashboard, run_dir.name, console=console, log_every_s=log_every_s)
    if not path.exists():
        print(
            f"waiting up to {wait_s:.0f}s for {path} (is the job running with dashboard.jsonl = true?)",
            file=sys.stderr,
            flush=True,
        )
        deadline = time.monotonic() + wait_s
        while not path.exists():
            if time.monotonic() >= deadline:
                raise SystemExit(f"no metrics file at {path} after {wait_s:.0f}s: check --run-dir / run.name")
            time.sleep(min(poll_s, 0.5))

    offset = 0

    def poll() -> None:
        nonlocal offset
        events, offset = read_metrics(path, offset)
        for ev in events:
            dash.feed(ev)

    # read before start(): the file's first event, not the moment we attached, then anchors uptime and rates
    poll()
    if not dash.live:  # e.g. piped to a file: one full picture first, then start() prints summary lines
        print(dash.snapshot_text(width=140), flush=True)
    dash.start()
    try:
        i = 0
        while max_iterations is None or i < max_iterations:
            time.sleep(poll_s)
            poll()
            i += 1
    except KeyboardInterrupt:
        pass
    finally:
        dash.stop()
    return dash
