"""`python -m tests.bench`: every scenario on the local embedded stack, into tests/bench/results/<date>.md."""

from __future__ import annotations

import sys
import time
import traceback
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path

import click

from tests.bench import SCENARIOS, TITLES

# Only click and the standard library at import time: `--help` must answer without the benchmark's own
# dependencies (psutil, the embedded servers, Celery), which come with the bench extra.
ROOT = Path(__file__).resolve().parents[2]

DEFAULT_N = 20_000
DEFAULTS = {"backlogs": "1000,10000,100000", "scale_rows": "1000000,5000000"}
QUICK = {
    "n": 2_000,
    "seconds": 3.0,
    "latency_seconds": 4.0,
    "backlogs": "1000,3000,10000",
    "scale_rows": "100000,500000",
    "scale_user_rows": 10_000,
    "relay_mails": 150,
}


def _counts(value: str, what: str = "sender counts, e.g. 1,2,4") -> list[int]:
    try:
        counts = [int(x.replace("_", "")) for x in value.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"a comma-separated list of {what}") from None
    if not counts or any(c < 1 for c in counts):
        raise click.BadParameter(f"at least one of the {what.split(',')[0]}, each 1 or more")
    return counts


_senders = _counts


class Tick:
    """Advance a bar (``tick(n)``) or say what the step is doing now (``tick.note("…")``)."""

    def __init__(self, bar=None):
        self.bar = bar

    def __call__(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text)


class Progress:
    """One tqdm bar per step, labelled with which step of how many this is."""

    def __init__(self, steps: int, enabled: bool):
        self.steps, self.done, self.enabled = steps, 0, enabled

    @contextmanager
    def step(self, title: str, total: int | None = None, unit: str = "mail"):
        self.done += 1
        label = f"[{self.done}/{self.steps}] {title}"
        if not self.enabled:
            yield Tick()
            return
        from tqdm import tqdm

        with tqdm(
            total=total,
            desc=label,
            unit=unit,
            file=sys.stderr,
            mininterval=0.3,
            dynamic_ncols=True,
            leave=True,
        ) as bar:
            yield Tick(bar)


@click.command()
@click.option(
    "--n", "n", type=int, default=None, help=f"mails per delivery scenario [default: {DEFAULT_N:,}]"
)
@click.option(
    "--senders",
    default="1,2,4,8",
    show_default=True,
    help="sender process counts for scenario 2 (the curve), comma-separated; the other scenarios run "
    "as many sender processes as the machine has cores, as `mailq dev` does",
)
@click.option(
    "--backlogs",
    default=None,
    help=f"queued backlog sizes for scenario 9, comma-separated [default: {DEFAULTS['backlogs']}]",
)
@click.option(
    "--quick",
    is_flag=True,
    help="small sizes everywhere (N=2,000, 3 s loads, backlogs of 1k/3k/10k, 100k and 500k rows): "
    "a few minutes",
)
@click.option("--skip-celery", is_flag=True, help="leave out scenario 3 (Celery)")
@click.option("--skip-scale", is_flag=True, help="leave out scenario 11 (millions of rows)")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=ROOT / "tests" / "bench" / "results",
    show_default="tests/bench/results",
    help="directory for <date>.md, .png and .json",
)
@click.option(
    "--only",
    default=",".join(SCENARIOS),
    show_default=True,
    help="scenarios to run, comma-separated: " + ", ".join(SCENARIOS),
)
@click.option(
    "--clients", type=int, default=16, show_default=True, help="concurrent clients for the enqueue API"
)
@click.option("--seconds", type=float, default=None, help="length of each API load [default: 10]")
@click.option("--latency-seconds", type=float, default=None, help="length of scenario 7's load [default: 10]")
@click.option(
    "--scale-rows",
    default=None,
    help=f"table sizes of scenario 11, comma-separated [default: {DEFAULTS['scale_rows']}]",
)
@click.option(
    "--scale-user-rows", type=int, default=None, help="tasks per user in scenario 11 [default: 100,000]"
)
@click.option(
    "--profile",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="write py-spy profiles of the workers and the sink to this directory",
)
@click.option(
    "--relay-mails", type=int, default=None, help="mails per client and RTT in scenario 12 [default: 300]"
)
@click.option(
    "--relay-rtts", default="0,20,50", show_default=True, help="round-trip times of scenario 12, in ms"
)
@click.option("--skip-postfix", is_flag=True, help="leave Postfix out of scenario 12")
@click.option("--no-progress", is_flag=True, help="no progress bars")
def bench(
    n,
    senders,
    backlogs,
    quick,
    skip_celery,
    skip_scale,
    out,
    only,
    clients,
    seconds,
    latency_seconds,
    scale_rows,
    scale_user_rows,
    profile,
    relay_mails,
    relay_rtts,
    skip_postfix,
    no_progress,
) -> None:
    """Measure delivery and enqueue against the raw SMTP limit and against Celery, in one run.

    Writes OUT/<date>.md (scenario, figures, ratio, target, met), a PNG chart and a JSON of the
    numbers. Exits non-zero when a correctness check fails (a mail lost or sent twice); missing a
    performance target is reported, not an error.
    """
    sizes = QUICK if quick else {}
    n = n or sizes.get("n", DEFAULT_N)
    seconds = seconds or sizes.get("seconds", 10.0)
    latency_seconds = latency_seconds or sizes.get("latency_seconds", 10.0)
    scale_rows = _counts(scale_rows or sizes.get("scale_rows", DEFAULTS["scale_rows"]), "row counts")
    scale_user_rows = min(min(scale_rows), scale_user_rows or sizes.get("scale_user_rows", 100_000))
    backlogs = _counts(backlogs or sizes.get("backlogs", DEFAULTS["backlogs"]), "backlog sizes")
    sender_counts = _senders(senders)
    relay_mails = relay_mails or sizes.get("relay_mails", 300)
    try:
        rtts = tuple(float(x) for x in relay_rtts.split(",") if x.strip())
    except ValueError:
        raise click.BadParameter("comma-separated milliseconds", param_hint="--relay-rtts") from None
    if not rtts or any(r < 0 for r in rtts):
        raise click.BadParameter("at least one round-trip time, none negative", param_hint="--relay-rtts")
    wanted = [s.strip() for s in only.split(",") if s.strip()]
    unknown = set(wanted) - set(SCENARIOS)
    if unknown:
        raise click.BadParameter(f"unknown scenario(s): {', '.join(sorted(unknown))}", param_hint="--only")

    from tests.bench.report import Run, write
    from tests.bench.stack import Stack

    run = Run(
        started=datetime.now(),
        options={
            "n": n,
            "senders": ",".join(map(str, sender_counts)),
            "backlogs": ",".join(map(str, backlogs)),
            "clients": clients,
            "seconds": seconds,
            "latency_seconds": latency_seconds,
            "scale_rows": ",".join(map(str, scale_rows)),
            "scale_user_rows": scale_user_rows,
            "relay_mails": relay_mails,
            "relay_rtts": ",".join(f"{r:g}" for r in rtts),
        },
    )
    for scenario in SCENARIOS:
        if scenario not in wanted:
            run.skipped[scenario] = "--only"
    if skip_celery:
        run.skipped["celery"] = "--skip-celery"
    if skip_scale:
        run.skipped["scale"] = "--skip-scale"
    if "celery" not in run.skipped:
        try:
            import celery  # noqa: F401
        except ImportError:
            raise click.ClickException(
                "Celery is not installed: `pip install -e '.[bench]'`, or pass --skip-celery"
            ) from None
    todo = [s for s in SCENARIOS if s not in run.skipped]
    per = {"mailq": len(sender_counts) + 1, "backlog": len(backlogs), "scale": len(scale_rows)}
    steps = sum(per.get(s, 1) for s in todo) + 1
    steps += 1 if {"inbox", "batch", "latency", "backlog", "fairness"} & set(todo) else 0
    steps += 1 if "raw" in todo and {"mailq", "celery"} & set(todo) else 0  # the raw limit, measured again
    progress = Progress(steps, enabled=not no_progress)
    started = time.monotonic()
    with ExitStack() as cleanup:
        with progress.step("starting PostgreSQL and Redis", 1, unit="step") as tick:
            stack = cleanup.enter_context(Stack())
            tick(1)
        _run_scenarios(
            run,
            stack,
            progress,
            todo,
            n,
            sender_counts,
            backlogs,
            clients,
            seconds,
            latency_seconds,
            scale_rows,
            scale_user_rows,
            profile,
        )
        if "relay" in todo:
            _relay(run, stack, progress, relay_mails, rtts, postfix=not skip_postfix)
    run.seconds = time.monotonic() - started
    path = write(run, out)
    click.echo(f"wrote {path} ({run.seconds / 60:.1f} min)")
    for scenario, error in run.failed.items():
        click.echo(f"{TITLES[scenario]} FAILED: {error}", err=True)
    if not run.correct:
        raise click.ClickException("a correctness check failed: see the report")


def _guard(run, scenario: str):
    """Record a scenario that raised, and go on with the next one."""

    @contextmanager
    def guard():
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - the report names it; the other scenarios still run
            run.failed[scenario] = (
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            )
            traceback.print_exc()

    return guard()


def _run_scenarios(
    run,
    stack,
    progress,
    todo,
    n,
    sender_counts,
    backlogs,
    clients,
    seconds,
    latency_seconds,
    scale_rows,
    scale_user_rows,
    profile,
) -> None:
    from shared.config import Settings
    from tests.bench import api, delivery, scale
    from tests.bench.stack import DECLARED_CONNECTIONS, default_senders

    stack.declare_connections(DECLARED_CONNECTIONS)  # the accounts' own smtp_max_connections

    def raw_limit(when: str) -> None:
        with _guard(run, "raw"), progress.step(f"1. raw limit ({when}): one smtplib connection", n) as tick:
            run.raw_runs.append(delivery.raw_limit(stack, n, tick))
            good = [d for d in run.raw_runs if d.ok] or run.raw_runs
            run.raw = max(good, key=lambda d: d.rate)

    if "raw" in todo:
        raw_limit("first")
    if "mailq" in todo:
        with _guard(run, "mailq"):
            for k in sender_counts:
                with progress.step(f"2. mailq, {k} sender(s)", n) as tick:
                    profiler = _profiler(profile, f"mailq-{k}")
                    run.mailq.append(delivery.mailq_delivery(stack, n, k, tick, profiler=profiler))
            k, default = default_senders(), Settings().smtp_max_connections_per_account
            with progress.step(f"2. mailq, {k} sender(s), the default {default} connections", n) as tick:
                stack.declare_connections(default)
                try:
                    label = f", default {default} connections"
                    run.mailq_default = delivery.mailq_delivery(stack, n, k, tick, label=label)
                finally:
                    stack.declare_connections(DECLARED_CONNECTIONS)
    best_k = run.best.concurrency // stack.settings.worker_count if run.best else sender_counts[0]
    if "celery" in todo:
        with _guard(run, "celery"), progress.step("3. Celery + Redis", n) as tick:
            run.celery = delivery.celery_delivery(
                stack, n, best_k * stack.settings.worker_count, tick, profiler=_profiler(profile, "celery")
            )
    if "raw" in todo and {"mailq", "celery"} & set(todo):
        raw_limit("again")
    if "api" in todo:
        with _guard(run, "api"), progress.step(f"4. enqueue API, {clients} clients", 2, unit="load") as tick:
            run.api = api.enqueue_api(stack, clients=clients, seconds=seconds, on_done=tick)
    pipelined = [s for s in ("inbox", "batch", "latency", "backlog", "fairness") if s in todo]
    if pipelined:
        _pipelined(run, stack, progress, pipelined, n, backlogs, clients, latency_seconds)
    if "scale" in todo:
        with _guard(run, "scale"):
            for rows in scale_rows:
                with progress.step(f"11. scale: {rows:,} rows", rows, unit="row") as tick:
                    run.scale.append(
                        scale.scale(
                            stack,
                            rows=rows,
                            user_rows=scale_user_rows,
                            live_rows=min(scale_rows),  # the same live work at every size
                            clients=clients,
                            seconds=seconds,
                            page_seconds=seconds,
                            progress=tick,
                        )
                    )


def _pipelined(run, stack, progress, todo, n, backlogs, clients, latency_seconds) -> None:
    """Scenarios 5-7, 9 and 10 on one warm `mailq dev`-like stack (one sender process per core)."""
    from tests.bench import inbox
    from tests.bench.stack import default_senders

    try:
        with progress.step("starting the `mailq dev` stack", 1, unit="step") as tick:
            pipe = inbox.Running(stack, default_senders()).__enter__()
            tick(1)
    except Exception:  # noqa: BLE001 - every scenario that needed it says why
        for scenario in todo:
            with _guard(run, scenario):
                raise
        return
    try:
        if "inbox" in todo:
            with _guard(run, "inbox"), progress.step(f"5. API to inbox, {clients} clients", n) as tick:
                run.inbox = inbox.api_to_inbox(pipe, n, clients=clients, progress=tick)
        if "batch" in todo:
            with _guard(run, "batch"), progress.step("6. API to inbox, batches of 100", n) as tick:
                run.batch = inbox.api_to_inbox(
                    pipe, n, clients=clients, batch=inbox.BATCH_SIZE, progress=tick
                )
        if "latency" in todo:
            with _guard(run, "latency"):
                if run.inbox is None or not run.inbox.ok:
                    raise RuntimeError("no correct API-to-inbox run (scenario 5) to take half the rate of")
                rate = run.inbox.rate / 2
                total = max(1, int(rate * latency_seconds))
                with progress.step(f"7. end-to-end latency at {rate:,.0f}/s", total) as tick:
                    run.latency = inbox.latency(pipe, rate=rate, seconds=latency_seconds, progress=tick)
        if "backlog" in todo:
            with _guard(run, "backlog"):
                for size in backlogs:
                    with progress.step(f"9. backlog of {size:,}", size) as tick:
                        run.backlog.append(inbox.backlog(pipe, size, tick))
        if "fairness" in todo:
            with _guard(run, "fairness"), progress.step("10. fairness: A alone, then with B", 2 * n) as tick:
                run.fairness = inbox.fairness(pipe, n, clients=clients, progress=tick)
    finally:
        pipe.__exit__(None, None, None)


def _relay(run, stack, progress, n: int, rtts: tuple[float, ...], *, postfix: bool) -> None:
    from tests.bench.relay import relay_scenario

    clients = 3 if postfix else 2
    title = f"12. a relay {', '.join(f'{r:g}' for r in rtts)} ms away"
    with _guard(run, "relay"), progress.step(title, n * clients * len(rtts)) as tick:
        run.relay = relay_scenario(stack, n, rtts, postfix=postfix, progress=tick)


def _profiler(profile: Path | None, name: str):
    if profile is None:
        return None
    from tests.bench.profile import Profiler

    return Profiler(Path(profile) / name)


if __name__ == "__main__":
    bench(prog_name="python -m tests.bench")
