"""``kt events ...``: the ledger's commands, registered by sidecar/cli.py.

- ``kt events stats --last 24h [--config POLICY | --dir DIR | --dsn DSN | --dsn-file F] [--json]``
  ``[--metric NAME]... [--by tenant|model|provider]``: the distribution of a number of the
  usage events instead (sidecar/ledger/metric_stats.py)
- ``kt events migrate [--config POLICY | --dsn DSN | --dsn-file F]``
- ``kt events dead-letters [--file F] [--config POLICY | --dir DIR | --dsn DSN | --dsn-file F]
  [--load] [--json]``: what the sink refused and why; ``--load`` writes them to the sink
  once the cause is fixed

The source is taken from the flags, else from the policy's ``ledger:`` section
(``--config``), else the default file sink directory (kt-state/events)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional


def _source(args: argparse.Namespace) -> tuple[Optional[str], Optional[str]]:
    """(directory, dsn) to read from; raises ValueError with a message for the user."""
    dsn = args.dsn
    if args.dsn_file:
        try:
            dsn = Path(args.dsn_file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"cannot read --dsn-file {args.dsn_file}: {exc.strerror}") from None
    if dsn:
        return None, dsn
    if getattr(args, "dir", None):
        return args.dir, None
    if args.config:
        from sidecar.policy.load import load_policy

        led = load_policy(args.config).ledger
        if led.sink == "postgres":
            dsn = led.dsn
            if led.dsn_file:
                dsn = Path(led.dsn_file).read_text().strip()
            return None, dsn
        return led.dir, None
    from sidecar.ledger.config import LedgerConfig

    return LedgerConfig().dir, None


def _stats(args: argparse.Namespace) -> int:
    from sidecar.ledger import metric_stats
    from sidecar.ledger.stats import Stats, parse_window, stats
    from sidecar.policy.load import PolicyError

    metrics = list(dict.fromkeys(args.metric))  # each once, in the order given
    try:
        window = parse_window(args.last)
        for m in metrics:
            metric_stats.check_metric(m)
        if args.by and not metrics:
            raise ValueError("--by groups the rows of --metric: give --metric NAME")
        directory, dsn = _source(args)
    except (ValueError, PolicyError) as exc:
        print(f"kt events stats: {exc}", file=sys.stderr)
        return 2
    until = time.time_ns() // 1000 + 1
    since = until - window * 1_000_000
    if directory is not None and not Path(directory).is_dir():
        print(f"kt events stats: no event directory {directory} (is the file sink elsewhere? "
              "--dir, or --config with the policy)", file=sys.stderr)
        return 1
    try:
        st: "metric_stats.MetricStats | Stats"
        if metrics and dsn:
            st = metric_stats.from_postgres(dsn, since, until, metrics, args.by or "")
        elif metrics:
            assert directory is not None
            st = metric_stats.from_directory(directory, since, until, metrics, args.by or "")
        else:
            st = stats(directory, dsn, since, until)
    except Exception as exc:  # noqa: BLE001 - psycopg's errors, OSError: one clear line
        print(f"kt events stats: {type(exc).__name__}: {str(exc).strip()}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(st.to_json(), indent=2, sort_keys=True))
    else:
        sys.stdout.write(st.text())
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from sidecar.policy.load import PolicyError

    try:
        _, dsn = _source(args)
    except (ValueError, PolicyError) as exc:
        print(f"kt events migrate: {exc}", file=sys.stderr)
        return 2
    if not dsn:
        print("kt events migrate: no PostgreSQL to migrate: give --dsn, --dsn-file, or a "
              "--config whose ledger sink is postgres", file=sys.stderr)
        return 2
    from sidecar.ledger.postgres import migrate

    try:
        version = migrate(dsn)
    except Exception as exc:  # noqa: BLE001 - psycopg's errors: one clear line
        print(f"kt events migrate: {type(exc).__name__}: {str(exc).strip()}", file=sys.stderr)
        return 1
    print(f"ledger schema at version {version}")
    return 0


def _dead_letter_file(args: argparse.Namespace, directory: Optional[str]) -> Path:
    if args.file:
        return Path(args.file)
    if args.config:
        from sidecar.policy.load import load_policy

        led = load_policy(args.config).ledger
        if led.dead_letter_file:
            return Path(led.dead_letter_file)
        return Path(led.dir) / "dead-letter.jsonl"
    from sidecar.ledger.config import LedgerConfig

    return Path(directory or LedgerConfig().dir) / "dead-letter.jsonl"


def _dead_letters(args: argparse.Namespace) -> int:
    from sidecar.ledger.deadletter import load, summary
    from sidecar.policy.load import PolicyError

    try:
        directory, dsn = _source(args)
        path = _dead_letter_file(args, directory)
    except (ValueError, PolicyError) as exc:
        print(f"kt events dead-letters: {exc}", file=sys.stderr)
        return 2
    if not path.exists():
        print(f"kt events dead-letters: no dead letters ({path} does not exist)")
        return 0
    failure = ""
    try:
        if args.load:
            done, failure = load(path, directory, dsn)
        else:
            done = summary(path)
    except Exception as exc:  # noqa: BLE001 - psycopg's errors, OSError: one clear line
        print(f"kt events dead-letters: {type(exc).__name__}: {str(exc).strip()}",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(done, indent=2, sort_keys=True))
    else:
        for key, n in sorted(done.items()):
            print(f"{n:>8}  {key}")
    if failure:
        print(f"kt events dead-letters: the sink failed, the rest stays in {path}: {failure}",
              file=sys.stderr)
        return 1
    return 0


def register(sub) -> None:
    """Add ``kt events`` to the main parser's subcommands."""
    ev = sub.add_parser("events", help="the ledger's usage events: stats, migrate")
    evsub = ev.add_subparsers(dest="events_command", required=True)

    def source_flags(p: argparse.ArgumentParser, with_dir: bool) -> None:
        p.add_argument("--config", help="policy YAML whose `ledger:` section names the sink")
        if with_dir:
            p.add_argument("--dir", help="a file sink's directory")
        p.add_argument("--dsn", help="PostgreSQL connection string")
        p.add_argument("--dsn-file", help="a file holding the connection string")

    st = evsub.add_parser("stats", help="counts, tokens, cost and refusals per tenant, model "
                          "and provider over a recent window")
    source_flags(st, with_dir=True)
    st.add_argument("--last", default="24h", help="window: 1h, 24h, 30d, ...")
    st.add_argument("--metric", action="append", default=[], metavar="NAME",
                    help="instead: count, p50, p95, p99 and max of one number of the usage "
                    "events (repeatable; files or PostgreSQL): input_tokens, output_tokens, "
                    "total_tokens, cached_tokens, estimate_tokens, cost_usd, "
                    "upstream_latency_seconds, ttft_seconds, output_tokens_per_second, "
                    "requests_per_minute, tokens_per_minute")
    st.add_argument("--by", choices=["tenant", "model", "provider"],
                    help="with --metric: a row per tenant, model (served) or provider")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=_stats)

    mg = evsub.add_parser("migrate", help="create the ledger's PostgreSQL tables (idempotent)")
    source_flags(mg, with_dir=False)
    mg.set_defaults(func=_migrate)

    dl = evsub.add_parser("dead-letters", help="events the sink refused, by reason; --load "
                          "writes them to the sink once the cause is fixed")
    source_flags(dl, with_dir=True)
    dl.add_argument("--file", help="the dead-letter file (default: the sink directory's "
                    "dead-letter.jsonl)")
    dl.add_argument("--load", action="store_true", help="write them to the sink; those it "
                    "still refuses stay in the file")
    dl.add_argument("--json", action="store_true", help="print JSON")
    dl.set_defaults(func=_dead_letters)
