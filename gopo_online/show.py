"""`gopo-online show RUN_DIR`: read the dialogues a run produced (its trajectory store, run_dir/trajectories).

- the episode table, filtered by persona group, scenario, status, outcome, reward range and policy version;
- one dialogue turn by turn (`--episode ID`): the user's utterance and metadata, the Expert's skills vs the
  teacher's, the CS reply and action, every hard-constraint check, the judge's scores with its raw answer, and
  every reward component;
- `--compare vA vB`: the same persona and scenario (same seed first: the paired episodes of an evaluation) under
  two policy versions, one after the other;
- `--html FILE`: a static page of the same view (no script, no external resource).

The episode's version is the oldest policy version that produced one of its turns; its reward is the mean joint
reward R_t (gopo eq 10) over the rewarded turns.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gopo_online.trajectory_store import read_records
from gopo_online.types import Trajectory, Turn

__all__ = ["Episode", "Filters", "load_episodes", "main", "pairs", "render_html"]


@dataclass(frozen=True)
class Episode:
    traj: Trajectory
    outcome: str
    learner_version: int | None

    @property
    def id(self) -> str:
        return self.traj.episode_id

    @property
    def version(self) -> int | None:
        return self.traj.min_policy_version

    @property
    def reward(self) -> float | None:
        rs = [t.rewards.joint for t in self.traj.turns if t.rewards is not None]
        return sum(rs) / len(rs) if rs else None

    def row(self) -> list[str]:
        t = self.traj
        return [
            t.episode_id,
            t.persona_group or "-",
            t.scenario_id,
            t.status,
            self.outcome,
            _num(self.version, 0),
            str(len(t.turns)),
            _num(self.reward),
            _num(t.final_satisfaction, 0),
        ]


ROW_HEADERS = ("episode", "group", "scenario", "status", "outcome", "v", "turns", "reward", "sat")


@dataclass(frozen=True)
class Filters:
    group: str | None = None
    scenario: str | None = None
    status: str | None = None
    outcome: str | None = None
    min_reward: float | None = None
    max_reward: float | None = None
    version: int | None = None
    persona: str | None = None

    def keep(self, ep: Episode) -> bool:
        t = ep.traj
        exact = (
            (self.group, t.persona_group),
            (self.scenario, t.scenario_id),
            (self.status, t.status),
            (self.outcome, ep.outcome),
            (self.persona, t.persona_id),
            (self.version, ep.version),
        )
        if any(want is not None and have != want for want, have in exact):
            return False
        if self.min_reward is None and self.max_reward is None:
            return True
        r = ep.reward  # an episode without a reward (an error episode) is outside any reward range
        lo = -math.inf if self.min_reward is None else self.min_reward
        hi = math.inf if self.max_reward is None else self.max_reward
        return r is not None and lo <= r <= hi


def _num(v: float | int | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}" if digits else str(int(v))


def load_episodes(run_dir: Path | str) -> list[Episode]:
    """The run's stored trajectories (last record per episode id; dead letters left out). A folder without a
    store but with a ``trajectories.jsonl`` of plain Trajectory lines (a `stress` or evaluation output) is read
    too, with outcome "-"."""
    run_dir = Path(run_dir)
    if (run_dir / "trajectories").is_dir():
        out = []
        for rec in read_records(run_dir):
            if rec["outcome"] == "dead_lettered":
                continue
            traj = Trajectory.model_validate(rec["trajectory"])
            out.append(Episode(traj, rec["outcome"], rec.get("learner_version")))
        return out
    plain = run_dir / "trajectories.jsonl"
    if plain.is_file():
        with open(plain, encoding="utf-8") as f:
            return [Episode(Trajectory.model_validate_json(line), "-", None) for line in f if line.strip()]
    raise FileNotFoundError(
        f"{run_dir} has no trajectories/ folder (nor a trajectories.jsonl): not a run folder, or a run from before "
        "the trajectory store"
    )


def pairs(episodes: Sequence[Episode], va: int, vb: int) -> list[tuple[Episode, Episode]]:
    """Episodes of the same persona + scenario under versions `va` and `vb`: same seed first (paired episodes),
    then any remaining of the same persona + scenario, each episode used once."""
    a = [e for e in episodes if e.version == va]
    b = [e for e in episodes if e.version == vb]
    out: list[tuple[Episode, Episode]] = []
    used: set[str] = set()
    for key in (
        lambda e: (e.traj.persona_id, e.traj.scenario_id, e.traj.seed),
        lambda e: (e.traj.persona_id, e.traj.scenario_id),
    ):
        for ea in a:
            if ea.id in used:
                continue
            match = next((eb for eb in b if eb.id not in used and key(eb) == key(ea)), None)
            if match is not None:
                out.append((ea, match))
                used |= {ea.id, match.id}
    return out


# --------------------------------------------------------------------------- turn contents (shared by both views)


def _skills_line(turn: Turn) -> tuple[str, str, str]:
    expert = ", ".join(turn.expert_skills)
    teacher = ", ".join(turn.teacher_skills) if turn.teacher_skills else "-"
    shared = len(set(turn.expert_skills) & set(turn.teacher_skills))
    agree = f"{shared}/{len(turn.teacher_skills)} teacher skills picked" if turn.teacher_skills else "no teacher"
    return expert, teacher, agree


def _meta_line(turn: Turn) -> str:
    m = turn.user_meta
    s = f"intent={m.intent} emotion={m.emotion} satisfaction={m.satisfaction} stop={'yes' if m.stop else 'no'}"
    if m.completed_tasks:
        s += f" tasks_done={','.join(m.completed_tasks)}"
    return s


def _state_line(turn: Turn) -> str:
    """The simulated user's own state (the agenda user model's, simulator.mode "agenda") after the agent turn that
    the message reacts to: only the entries that are set (non-empty, non-zero, true), `key=value` each."""
    st = turn.user_meta.state or {}
    parts = []
    for k, v in st.items():
        if v in (None, "", 0, False, [], {}):
            continue
        if isinstance(v, dict):
            v = ",".join(f"{a}:{b}" for a, b in v.items())
        elif isinstance(v, list | tuple):
            v = ",".join(map(str, v))
        elif v is True:
            v = "yes"
        parts.append(f"{k}={v}")
    return " ".join(parts)


def _checks(turn: Turn) -> list[tuple[bool, str]]:
    return [(c.passed, f"{c.kind} {c.skill}: {c.target}") for c in turn.compliance.checks]


def _judge_lines(turn: Turn) -> tuple[str, str]:
    j = turn.judge
    if j is None:
        return "no judge", ""
    scores = " ".join(f"{k}={v:.2f}" for k, v in j.scores.items())
    if j.principles:
        scores += " | " + " ".join(f"{k}={v:g}" for k, v in j.principles.items())
    if not j.ok:
        scores += f" | FAILED: {j.error or '?'}"
    return scores or "-", j.raw


def _reward_line(turn: Turn) -> str:
    r = turn.rewards
    if r is None:
        return f"not rewarded · cost={turn.cost:g}"
    parts = [
        f"r_expert={r.r_expert:.3f}",
        f"r_cs={r.r_cs:.3f}",
        f"w_E={r.w_expert:.2f}",
        f"w_A={r.w_cs:.2f}",
        f"joint={r.joint:.3f}",
        f"process={r.process:.3f}",
        f"compliance={r.compliance:.2f}",
        f"skill_distance={_num(r.skill_distance)}",
        f"cost={turn.cost:g}",
    ]
    return " ".join(parts)


def _header(ep: Episode) -> str:
    t = ep.traj
    return (
        f"{t.episode_id} · persona {t.persona_id} ({t.persona_group or '-'}) · {t.scenario_id} · seed {t.seed}"
        f" · v{_num(ep.version, 0)} · {t.status} · {ep.outcome} · reward {_num(ep.reward)}"
        f" · final satisfaction {_num(t.final_satisfaction, 0)} · {'user ended' if t.finished else 'turn limit'}"
    )


# --------------------------------------------------------------------------- console


def print_list(con: Any, episodes: Sequence[Episode], limit: int, title: str = "episodes") -> None:
    """The episode table; when it does not fit the console, the long text columns (group, scenario) move to a
    second line under each episode, so no column is folded mid-word."""
    from rich.text import Text

    from gopo_online.tables import print_table, table_width

    shown = episodes[:limit] if limit else episodes
    more = f" (first {len(shown)} of {len(episodes)})" if len(shown) < len(episodes) else f" ({len(episodes)})"
    rows = [e.row() for e in shown]
    numeric = [h in ("v", "turns", "reward", "sat") for h in ROW_HEADERS]
    if table_width(ROW_HEADERS, rows, numeric)[0] <= con.width or not rows:
        print_table(con, title + more, ROW_HEADERS, rows)
        return
    keep = [i for i, h in enumerate(ROW_HEADERS) if h not in ("group", "scenario")]
    heads = [ROW_HEADERS[i] for i in keep]
    widths = [max(len(heads[j]), *(len(r[i]) for r in rows)) for j, i in enumerate(keep)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if numeric[i] else c.ljust(w) for c, w, i in zip(cells, widths, keep, strict=True))

    con.print(Text(title + more + " · group · scenario on the line below each", style="bold"), overflow="fold")
    con.print(Text(line(heads).rstrip(), style="bold"))
    for r in rows:
        con.print(line([r[i] for i in keep]).rstrip())
        con.print(Text(f"  {r[1]} · {r[2]}", style="dim"), overflow="fold")


def print_episode(con: Any, ep: Episode) -> None:
    from rich.rule import Rule
    from rich.table import Table
    from rich.text import Text

    con.print(Rule(style="cyan"))
    con.print(Text(_header(ep), style="bold"))
    if ep.traj.error:
        con.print(Text(f"error: {ep.traj.error}", style="red"))
    for turn in ep.traj.turns:
        g = Table.grid(padding=(0, 1))
        g.add_column(style="dim", no_wrap=True, width=7)
        g.add_column(overflow="fold")
        v = turn.policy_version
        con.print(Text(f"turn {turn.index}" + (f" · v{v}" if v is not None else ""), style="bold cyan"))
        g.add_row("user", Text(turn.user_utterance))
        g.add_row("", Text(_meta_line(turn), style="dim"))
        if state := _state_line(turn):
            g.add_row("state", Text(state, style="dim"))
        expert, teacher, agree = _skills_line(turn)
        g.add_row("expert", Text(expert, style="yellow"))
        g.add_row("teacher", Text(f"{teacher}  ({agree})", style="dim"))
        reply = Text(f"[{turn.cs_action}] ", style="bold blue")
        reply.append(turn.cs_reply)
        g.add_row("cs", reply)
        for ok, text in _checks(turn):
            g.add_row("check", Text(("✓ " if ok else "✗ ") + text, style="green" if ok else "red"))
        scores, raw = _judge_lines(turn)
        g.add_row("judge", Text(scores))
        if raw:  # one line per answer line would scroll a short multi-line answer off the screen
            g.add_row("raw", Text(" ⏎ ".join(raw.splitlines()), style="dim"))
        g.add_row("reward", Text(_reward_line(turn)))
        con.print(g)


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1d232b;background:#f7f8fa}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:18px 0 6px}
table.eps{border-collapse:collapse;background:#fff;font-variant-numeric:tabular-nums}
table.eps th,table.eps td{border:1px solid #d5d9e0;padding:3px 8px;text-align:left}
table.eps td.n{text-align:right} table.eps td:first-child{white-space:nowrap} table.eps tr.st-error td{color:#a11}
.ep{background:#fff;border:1px solid #d5d9e0;border-radius:6px;padding:10px 14px;margin:12px 0}
.ep h3{font-size:14px;margin:0 0 8px}
.turn{border-top:1px solid #e6e9ee;padding:6px 0;display:grid;grid-template-columns:80px 1fr;gap:2px 10px}
.lab{color:#6b7480;font-size:12px;text-transform:uppercase;padding-top:2px}
.meta,.raw{color:#6b7480;font-size:12px} .raw{white-space:pre-wrap;font-family:ui-monospace,monospace}
.skills{color:#8a5a00} .act{font-weight:600;color:#1f4fb5} .ok{color:#177a2f} .bad{color:#b3261e}
.cmp{display:grid;grid-template-columns:1fr 1fr;gap:12px}
.tn{font-weight:600;color:#0b6e8a;grid-column:1/3}
"""


def _e(s: Any) -> str:
    return html.escape(str(s))


def _html_list(episodes: Sequence[Episode]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in (*ROW_HEADERS, "error"))
    numeric = {"v", "turns", "reward", "sat"}
    body = []
    for ep in episodes:
        first, *rest = ep.row()
        cells = [f'<td><a href="#{_e(ep.id)}">{_e(first)}</a></td>']
        cells += [
            f'<td class="n">{_e(c)}</td>' if h in numeric else f"<td>{_e(c)}</td>"
            for h, c in zip(ROW_HEADERS[1:], rest, strict=True)
        ]
        err = ep.traj.error or ""
        short = err if len(err) <= 120 else err[:117] + "…"  # the whole text is in the dialogue below and the tooltip
        cells.append(f'<td title="{_e(err)}">{_e(short)}</td>')
        body.append(f'<tr class="st-{_e(ep.traj.status)}">{"".join(cells)}</tr>')
    return f'<table class="eps"><tr>{head}</tr>{"".join(body)}</table>'


def _html_episode(ep: Episode) -> str:
    parts = [f'<div class="ep" id="{_e(ep.id)}"><h3>{_e(_header(ep))}</h3>']
    if ep.traj.error:
        parts.append(f'<div class="bad">error: {_e(ep.traj.error)}</div>')
    for turn in ep.traj.turns:
        v = turn.policy_version
        rows = [f'<div class="tn">turn {turn.index}{f" · v{v}" if v is not None else ""}</div>']

        def row(label: str, content: str, rows: list[str] = rows) -> None:
            rows.append(f'<div class="lab">{_e(label)}</div><div>{content}</div>')

        row("user", f'{_e(turn.user_utterance)}<div class="meta">{_e(_meta_line(turn))}</div>')
        if state := _state_line(turn):
            row("state", f'<span class="meta">{_e(state)}</span>')
        expert, teacher, agree = _skills_line(turn)
        row("expert", f'<span class="skills">{_e(expert)}</span>')
        row("teacher", f'{_e(teacher)} <span class="meta">({_e(agree)})</span>')
        row("cs", f'<span class="act">[{_e(turn.cs_action)}]</span> {_e(turn.cs_reply)}')
        for ok, text in _checks(turn):
            row("check", f'<span class="{"ok" if ok else "bad"}">{"✓" if ok else "✗"} {_e(text)}</span>')
        scores, raw = _judge_lines(turn)
        row("judge", _e(scores) + (f'<div class="raw">{_e(raw)}</div>' if raw else ""))
        row("reward", _e(_reward_line(turn)))
        parts.append(f'<div class="turn">{"".join(rows)}</div>')
    parts.append("</div>")
    return "".join(parts)


def render_html(
    title: str,
    episodes: Sequence[Episode],
    shown: Iterable[Episode] = (),
    compare: Sequence[tuple[Episode, Episode]] = (),
    versions: tuple[int, int] | None = None,
) -> str:
    """The static page: the filtered episode table, then the dialogues of `shown`, or the `compare` pairs."""
    body = [f"<h1>{_e(title)}</h1>", f"<h2>episodes ({len(episodes)})</h2>", _html_list(episodes)]
    for ep in shown:
        body.append(_html_episode(ep))
    if versions is not None:
        body.append(f"<h2>v{versions[0]} vs v{versions[1]}: {len(compare)} pairs (same persona + scenario)</h2>")
        for a, b in compare:
            body.append(f'<div class="cmp">{_html_episode(a)}{_html_episode(b)}</div>')
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n"
    )


# --------------------------------------------------------------------------- entry point


def main(
    run_dir: Path,
    *,
    episode: str | None = None,
    filters: Filters = Filters(),
    compare: tuple[int, int] | None = None,
    html_out: Path | None = None,
    limit: int = 50,
    dialogues: int = 0,
    out: Any = None,
    width: int | None = None,
) -> int:
    """Print the view; returns an exit code (2 when the run folder or the episode is missing)."""
    from rich.text import Text

    from gopo_online.tables import console

    con = console(out, width)
    try:
        all_eps = load_episodes(run_dir)
    except FileNotFoundError as e:
        con.print(Text(str(e), style="red"))
        return 2
    eps = [e for e in all_eps if filters.keep(e)]
    shown: list[Episode] = []
    if episode is not None:
        shown = [e for e in all_eps if e.id == episode]
        if not shown:
            con.print(Text(f"no episode {episode!r} in {run_dir} ({len(all_eps)} episodes stored)", style="red"))
            return 2
    elif dialogues:
        shown = eps[:dialogues]
    matched: list[tuple[Episode, Episode]] = []
    if compare is not None:
        matched = pairs(eps, *compare)
    title = f"gopo-online show {run_dir}"
    if not shown and compare is None:
        print_list(con, eps, limit)
    for ep in shown:
        print_episode(con, ep)
    if compare is not None:
        va, vb = compare
        con.print(Text(f"v{va} vs v{vb}: {len(matched)} pairs with the same persona + scenario", style="bold"))
        if not matched:
            have = sorted({e.version for e in eps if e.version is not None})
            con.print(f"versions in the (filtered) run: {have or 'none'}")
        for a, b in matched[: limit or None]:
            print_episode(con, a)
            print_episode(con, b)
    if html_out is not None:
        html_out.parent.mkdir(parents=True, exist_ok=True)
        page_shown = shown or (eps[: dialogues or 10] if compare is None else [])  # a page shows dialogues
        html_out.write_text(render_html(title, eps[:limit] if limit else eps, page_shown, matched, compare))
        con.print(f"wrote {html_out}")
    return 0
