"""The `tagstream` command line: one entry point for every part of the pipeline.

    tagstream run       the whole demo on the local broker: worker, sink, generated load
    tagstream worker    the Faust agents (SPEC §4)
    tagstream sink      deliver reports to the Marketing API (--target api), a file or stdout
    tagstream ingest    the HTTP server for WeCom's callbacks (SPEC §7) -> wecom-callbacks
    tagstream enrich    wecom-callbacks -> tag and contact events (WeCom API, snapshots, exactly once)
    tagstream tag       tag a customer through WeCom's API, and report it (WeCom sends no callback)
    tagstream reconcile find and repair what WeCom never called back about
    tagstream replay    historic events (a topic time range or NDJSON archives) -> reports
    tagstream archive   write a time range of the input topics to an NDJSON archive
    tagstream load      produce sample rules and a generated event stream
    tagstream topics    create the topics if missing
    tagstream lag       consumer lag (messages and seconds) of the worker and sink groups
    tagstream topology  print the topics, tables and agents
    tagstream settings  every setting, its default and its TAGSTREAM_* variable
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from typing import Optional, Sequence

from streams.settings import ConfigError, Settings, format_duration

EPILOG = ("Every setting can also come from a TAGSTREAM_* environment variable "
          "(see `tagstream settings`); flags win over the environment.")


def _settings_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each also a TAGSTREAM_* variable)")
    for variable, default, help_text in Settings.describe():
        name = variable[len("TAGSTREAM_"):].lower()
        group.add_argument("--" + name.replace("_", "-"), dest="setting_" + name, metavar=name.upper()
                           if not name.endswith("topic") else "NAME",
                           help=f"{help_text} [default: {default}]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tagstream", description=__doc__.split("\n\n")[0], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def command(name: str, help_text: str, description: str = "") -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=description or help_text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _settings_flags(p)
        return p

    p = command("run", "run the demo: broker must be up; starts worker and sink, feeds generated load",
                "Start a worker and a file sink, load sample reporting rules, then feed a realistic "
                "generated stream and show progress (events/s, reports by type, lag) until "
                "--events are processed or Ctrl-C. Example: tagstream run --events 20000")
    p.add_argument("--events", type=int, default=0, help="stop after this many events (0: until Ctrl-C)")
    p.add_argument("--rate", type=float, default=None,
                   help="events per second to offer; 0: as fast as possible "
                        "[default: 0 with --events, 1000 until Ctrl-C]")
    p.add_argument("--seed", type=int, default=None, help="random seed of the generated load (default: time)")
    p.add_argument("--reports-file", default=".state/run/reports.ndjson", help="where the sink writes NDJSON")
    p.add_argument("--via-wecom", action="store_true",
                   help="the load enters through WeCom: the fake WeCom's staff tag customers, its callbacks reach "
                        "`tagstream ingest` and `tagstream enrich` (--events counts callbacks; --rate defaults to 50/s; "
                        "needs a source checkout, for tests/fake_wecom)")

    command("worker", "run the Faust agents (tag and contact events -> reports)")

    p = command("sink", "deliver reports from the outbound topic to a target",
                "Consume the conversion-reports topic and deliver every report to the target: the "
                "Marketing API user_actions/add (once per outer_action_id, retried, rate limited), "
                "or an NDJSON file or stdout. Examples:\n"
                "  TAGSTREAM_MARKETING_API_BASE=https://api.e.qq.com TAGSTREAM_ACCESS_TOKEN_FILE=token "
                "tagstream sink --target api\n"
                "  tagstream sink --target file:reports.ndjson")
    p.add_argument("--target", required=True, help="api (the Marketing API), file:PATH (NDJSON) or stdout")

    command("ingest", "serve WeCom's callbacks: verify, decrypt, write to wecom-callbacks, answer",
            "The HTTP server WeCom calls back, for the corps in TAGSTREAM_WECOM_CORPS_FILE:\n"
            "GET and POST /wecom/<corp_id>/callback (URL verification and events), /healthz and\n"
            "/metrics, on TAGSTREAM_INGEST_LISTEN. A callback is answered only after it is written\n"
            "to wecom-callbacks with acks=all; one that fails verification gets a 4xx, is counted\n"
            "and writes nothing. docs/ingest.md has the corps file and each refusal.\n\n"
            "example:\n  TAGSTREAM_WECOM_CORPS_FILE=wecom-corps.yaml tagstream ingest --ingest-listen 0.0.0.0:8480")

    command("enrich", "turn WeCom's callbacks into tag and contact events, exactly once",
            "A consumer group (<app id>-enrich) on wecom-callbacks. For each callback it calls\n"
            "WeCom's externalcontact/get, compares the staff member's corp tags with the last\n"
            "snapshot of that relationship, and writes a tag event per difference (ids derived\n"
            "from the snapshot version, so retries and restarts repeat ids, never events), a\n"
            "contact event for adds and deletes (click id from ad-clicks by state), and the tag\n"
            "catalogue to wecom-tags. Events, snapshots and offsets go in one transaction per\n"
            "partition. Needs the corps file (contact secrets), like the ingest.\n\n"
            "example:\n  TAGSTREAM_WECOM_CORPS_FILE=wecom-corps.yaml tagstream enrich")

    p = command("tag", "tag a customer through WeCom's API (mark_tag) and report it like a callback",
                "WeCom sends no callback for changes made through its API, so a CRM sync or a bulk\n"
                "tagging with mark_tag is never reported. This calls mark_tag and, once WeCom accepts,\n"
                "writes the change to wecom-callbacks, where the enrichment turns it into the tag events\n"
                "a callback would have produced (same ids).\n\n"
                "example:\n  tagstream tag --corp ww51a2 --userid zhangsan --customer wmKx01 --add etQ7x --remove etA1")
    p.add_argument("--corp", required=True, help="corp id: in the corps file, or (provider mode) authorised")
    p.add_argument("--userid", required=True, help="the staff member whose relationship is tagged")
    p.add_argument("--customer", required=True, help="the customer's external_userid")
    p.add_argument("--add", default="", help="comma-separated tag ids to add")
    p.add_argument("--remove", default="", help="comma-separated tag ids to remove")

    p = command("reconcile", "compare every customer's tags in WeCom with the snapshots, and repair",
                "Callbacks lost for good, and API changes, never reach tagstream. This walks each\n"
                "staff member's customers (batch/get_by_user), compares them with the enrichment's\n"
                "snapshots, and writes a synthetic callback for each add never enriched and each\n"
                "relationship whose tags differ; the enrichment then emits exactly the missing events,\n"
                "with the ids a callback would have given. Safe while callbacks flow, rate limited,\n"
                "resumable (progress in TAGSTREAM_RECONCILE_STATE_DIR); a second run writes nothing.\n"
                "With --reconcile-every 6h (or TAGSTREAM_RECONCILE_EVERY) it keeps running, a pass every 6 h.\n\n"
                "examples:\n  tagstream reconcile\n  tagstream reconcile --corp ww51a2 --since 2026-11-01T00:00:00Z\n"
                "  tagstream reconcile --reconcile-every 6h")
    p.add_argument("--corp", action="append", default=[], help="only this corp (repeatable; default: all in the corps file and every authorised corp)")
    p.add_argument("--since", metavar="TIME", help="only relationships made since TIME (ISO-8601)")

    p = command("rules", "manage the reporting rules: import a CSV/YAML file, list, history, diff, unmap",
                "Every change is a new version on the rules topic (SPEC §3.3); none is ever rewritten.\n"
                "A file has the columns corp_id, tag (an id, or a name resolved through the catalogue\n"
                "in wecom-tags), standard_type, account_id, user_action_set_id, action_type (may be\n"
                "empty) and effective_from (ISO-8601, epoch ms, or now). One bad line refuses the\n"
                "whole file, and every bad line is listed with its reason. An effective_from in the\n"
                "past needs --retroactive (live processing has passed it), and the output names the\n"
                "replay range that applies it. Read-only but for import and unmap; no consumer group.\n\n"
                "examples:\n"
                "  tagstream rules diff mappings.csv        # the versions an import would publish\n"
                "  tagstream rules import mappings.csv\n"
                "  tagstream rules list --corp ww51a2 --as-of 2026-12-01T00:00:00+08:00\n"
                "  tagstream rules history ww51a2:etQ7x --json\n"
                "  tagstream rules unmap ww51a2:etQ7x --from 2026-12-08T00:00:00+08:00")
    p.add_argument("action", choices=("import", "list", "history", "diff", "unmap"), help="what to do")
    p.add_argument("target", nargs="?", metavar="FILE|CORP:TAG",
                   help="the rules file (import, diff) or the rule (history, unmap)")
    p.add_argument("--corp", help="list: only this corp's rules")
    p.add_argument("--as-of", metavar="TIME", help="list: the versions in force at TIME (ISO-8601) [default: now]")
    p.add_argument("--from", dest="from_time", metavar="TIME", help="unmap: from when (ISO-8601, or now)")
    p.add_argument("--retroactive", action="store_true",
                   help="allow an effective_from in the past (then replay the range the output names)")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")

    p = command("explain", "why a customer's conversions were (not) reported: a timeline, event by event",
                "Reads one customer's events (its one partition of both event topics, for the time\n"
                "range, never the whole topic) and runs them through the worker's own merge and engine\n"
                "with the worker's rule book, as replay does. For each event: the rule version it met,\n"
                "the outcome and why (reported, unmapped, already reported, held until T, cancelled,\n"
                "order after the window, no identity, duplicate), and each report's delivery state\n"
                "from delivered-reports (acked, failed with the API's answer, in doubt, not yet sent).\n"
                "It ends with why (not), type by type. Nothing before --from is read: it says what that\n"
                "hides. Read-only; no consumer group.\n\n"
                "examples:\n  tagstream explain ww51a2:wmKx01\n"
                "  tagstream explain ww51a2:wmKx01 --from 2026-12-01T00:00:00+08:00 --to 2026-12-02T00:00:00+08:00 --json")
    p.add_argument("customer", metavar="CORP:EXTERNAL_USERID", help="the customer")
    p.add_argument("--from", dest="from_time", metavar="TIME",
                   help="start of the range (ISO-8601) [default: --to less the dedupe horizon, 7 days]")
    p.add_argument("--to", dest="to_time", metavar="TIME", help="end of the range (ISO-8601) [default: now]")
    p.add_argument("--json", action="store_true", help="the timeline as JSON")

    p = command("load", "produce sample reporting rules and a generated event stream",
                "Produce the sample rules, then N generated events. Without --rate, as fast as\n"
                "possible, with simulated event time running ahead of the clock (40 ms per event);\n"
                "with --rate, paced, and each event's ts is the wall clock when it is made, so\n"
                "loads run one after another never overlap in event time.\n\n"
                "examples:\n  tagstream load --events 10000\n"
                "  tagstream load --events 0 --seed 2                  # the rules only\n"
                "  tagstream load --events 30000 --rate 2000 --no-rules # 15 s of live traffic")
    p.add_argument("--events", type=int, required=True, help="how many events to produce (0: the rules only)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the generated load")
    p.add_argument("--no-rules", action="store_true", help="do not produce the sample rules")
    p.add_argument("--rate", type=float, default=0, help="events per second, with live event time (0: as fast "
                   "as possible, simulated event time) [default: 0]")

    p = command("replay", "replay historic tag events: a topic time range or NDJSON archives",
                "Fold historic events through the same engine as the worker, with the rules as of\n"
                "each event's ts, and produce exactly the reports a live run would have. Replay\n"
                "state is in memory and topics are read with no consumer group: the live worker is\n"
                "never touched. Reports go to the outbound topic, where the sink skips every\n"
                "outer_action_id already delivered; with --dry-run they go to a file, with a\n"
                "comparison against what was delivered (new, already delivered, would change).\n\n"
                "examples:\n"
                "  tagstream replay --from 2026-11-01T00:00:00Z --to 2026-11-02T00:00:00Z --dry-run\n"
                "  tagstream replay --files archive/2026-11-01.ndjson.gz --dry-run --out fixed.ndjson\n"
                "  tagstream replay --from 2026-11-01T00:00+08:00 --to 2026-11-01T12:00+08:00")
    p.add_argument("--from", dest="from_time", metavar="TIME",
                   help="start of the range, ISO-8601 (naive means UTC); required without --files")
    p.add_argument("--to", dest="to_time", metavar="TIME", help="end of the range (exclusive), ISO-8601")
    p.add_argument("--files", nargs="+", metavar="FILE", default=[],
                   help="replay NDJSON archives (plain or .gz, as `tagstream archive` writes them) instead of topics")
    p.add_argument("--dry-run", action="store_true", help="write reports to --out instead of the outbound topic")
    p.add_argument("--out", default="replay-reports.ndjson",
                   help="--dry-run: reports file; unreportable and would-change details go beside it "
                        "[default: replay-reports.ndjson]")
    p.add_argument("--dead-letters", default="replay-dead-letters.ndjson",
                   help="file for records and archive lines that fail validation [default: replay-dead-letters.ndjson]")
    p.add_argument("--summary-json", metavar="FILE", help="also write the final summary as JSON")

    p = command("archive", "write the input topics' records of a time range to an NDJSON archive",
                "Keep history beyond topic retention: the rule book (every version) and every tag and\n"
                "contact record with a timestamp in [--from, --to), one JSON object per line. Replay it\n"
                "with `tagstream replay --files`.\n\n"
                "example:\n  tagstream archive --from 2026-11-01T00:00:00Z --to 2026-11-02T00:00:00Z "
                "--out archive/2026-11-01.ndjson.gz")
    p.add_argument("--from", dest="from_time", metavar="TIME", required=True, help="start, ISO-8601")
    p.add_argument("--to", dest="to_time", metavar="TIME", required=True, help="end (exclusive), ISO-8601")
    p.add_argument("--out", required=True, help="archive file; .gz compresses")

    command("topics", "create tagstream's topics if they are missing")
    p = command("lag", "print consumer lag per group, topic and partition, like kafka-consumer-groups --describe",
                "LAG is log-end offset minus committed offset; LAG-SECONDS is the age of the oldest\n"
                "unprocessed record (the one at the committed offset). Groups: the worker's (the\n"
                "app id) and the sink's (<app id>-sink).\n\n"
                "examples:\n  tagstream lag\n  tagstream lag --group tagstream-sink")
    p.add_argument("--group", default=None, help="only this group (default: both)")
    command("topology", "print the topics, tables and agents of the worker")
    p = command("settings", "list every setting with its default and environment variable",
                "Every setting, its default and its TAGSTREAM_* variable. With --markdown, the page\n"
                "docs/configuration.md (`make docs` writes it; a test checks it is current).")
    p.add_argument("--markdown", action="store_true", help="print the settings as the docs' Markdown page")
    return parser


def _settings_from(args: argparse.Namespace) -> Settings:
    overrides = {k[len("setting_"):]: v for k, v in vars(args).items()
                 if k.startswith("setting_") and v is not None}
    return Settings.load(overrides)


def _logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from streams.kafka import diagnose
    args = build_parser().parse_args(argv)
    recent = diagnose.install()
    try:
        settings = _settings_from(args)
        return COMMANDS[args.command](args, settings) or 0
    except ConfigError as exc:
        print(f"tagstream: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the broker is the usual suspect; say how to fix it
        why = diagnose.explain(exc, settings, recent)
        if why is None:
            raise
        print(f"tagstream: error: {why}", file=sys.stderr)
        return 1


def _uvloop() -> None:
    """uvloop's event loop (libuv; its transports are C): the worker's, and the ingest's, where
    it took one process's answers up by 11% when it came in (commit eff056a)."""
    try:
        import uvloop
        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency; keep running without it
        pass


def cmd_worker(args, settings: Settings) -> int:
    _uvloop()
    from streams.observability import metrics
    from streams.kafka.admin import ensure_topics
    from streams.state.local import mark_clean, open_local_state
    from streams.topology import DrainingWorker, build_topology

    asyncio.run(ensure_topics(settings))
    _logging(settings)
    open_local_state(settings.data_dir)
    # the health timer beats every metrics_interval (agents/health.py): three missed is stuck
    metrics.serve(settings.metrics_port, settings.metrics_host,
                  stale_after=max(30.0, 3 * settings.metrics_interval / 1000))
    metrics.watch_gc_pauses()
    topology = build_topology(settings)
    worker = DrainingWorker(topology.app, topology.before_stop, loglevel=settings.log_level, quiet=True)
    try:
        worker.execute_from_commandline()
    except SystemExit as exit_:
        if exit_.code in (0, None):
            mark_clean(settings.data_dir)
        raise
    return 0


def cmd_sink(args, settings: Settings) -> int:
    from streams.sinks.reporting import open_target, run_api_sink, run_file_sink
    from streams.kafka.admin import ensure_topics
    if args.target != "api":
        open_target(args.target).close() if args.target != "stdout" else None  # bad target: fail now
    _logging(settings)

    async def run():
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if args.target != "api":
            return await run_file_sink(settings, args.target, stop)
        from streams.observability import metrics
        from streams.kafka.connection import client_kwargs
        from streams.observability.lag import LagMonitor, monitored_groups
        await ensure_topics(settings)
        metrics.serve(settings.sink_metrics_port, settings.metrics_host, stale_after=30.0)
        lag = asyncio.create_task(LagMonitor(client_kwargs(settings), monitored_groups(settings))
                                  .run(settings.metrics_interval / 1000, stop))
        heartbeat = asyncio.create_task(metrics.heartbeat())
        try:
            return await run_api_sink(settings, stop)
        finally:
            lag.cancel()
            heartbeat.cancel()

    outcome = asyncio.run(run())
    if isinstance(outcome, dict):
        summary = ", ".join(f"{k} {v}" for k, v in sorted(outcome.items())) or "nothing to deliver"
        print(f"tagstream sink: {summary}", file=sys.stderr)
    else:
        print(f"tagstream sink: wrote {outcome} reports to {args.target}", file=sys.stderr)
    return 0


def cmd_ingest(args, settings: Settings) -> int:
    from streams.kafka.admin import ensure_topics
    from streams.wecom.corps import load_corps, load_suite
    from streams.wecom.ingest import serve
    from streams.wecom.provider import Vault
    corps = load_corps(settings)
    suite = load_suite(settings)
    vault = Vault.from_settings(settings) if suite else None
    api_token = None
    if settings.ingest_api_token_file:
        try:
            api_token = open(settings.ingest_api_token_file, encoding="utf-8").read().strip()
        except OSError as exc:
            raise ConfigError(f"TAGSTREAM_INGEST_API_TOKEN_FILE={settings.ingest_api_token_file!r}: cannot read it "
                              f"({exc.strerror})") from None
        if not api_token:
            raise ConfigError(f"TAGSTREAM_INGEST_API_TOKEN_FILE={settings.ingest_api_token_file!r} is empty")
    _logging(settings)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await ensure_topics(settings)
        await serve(settings, corps, stop, api_token, suite, vault)

    _uvloop()
    asyncio.run(run())
    return 0


def cmd_enrich(args, settings: Settings) -> int:
    from streams.kafka.admin import ensure_topics
    from streams.wecom.api import WeComClient
    from streams.wecom.corps import load_corps, load_suite
    from streams.wecom.enrich import Enrichment
    from streams.wecom.provider import AuthBook, Vault
    from streams.observability import metrics
    corps = load_corps(settings)
    suite = load_suite(settings)
    auth = AuthBook(Vault.from_settings(settings)) if suite else None
    _logging(settings)
    metrics.serve(settings.enrich_metrics_port, settings.metrics_host, stale_after=30.0)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        heartbeat = asyncio.create_task(metrics.heartbeat())
        await ensure_topics(settings)
        try:
            async with WeComClient(settings, corps, suite=suite, auth=auth) as client:
                await Enrichment(settings, corps, client).run(stop)
        finally:
            heartbeat.cancel()

    asyncio.run(run())
    return 0


def _ids(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def cmd_tag(args, settings: Settings) -> int:
    from streams.kafka import connection
    from streams.wecom.api import command_client
    from streams.wecom.corps import load_corps
    from streams.wecom.tagging import tag_through_wecom
    from aiokafka import AIOKafkaProducer
    corps = load_corps(settings)
    add, remove = _ids(args.add), _ids(args.remove)
    if not add and not remove:
        raise ConfigError("nothing to do: give --add TAG[,TAG] and/or --remove TAG[,TAG]")

    async def run() -> None:
        producer = AIOKafkaProducer(**connection.producer_kwargs(settings), client_id="tagstream-tag")
        await connection.start_client(producer)
        try:
            async with command_client(settings, corps, "tagstream-tag-auth") as client:
                if not client.serves(args.corp):
                    raise ConfigError(f"--corp {args.corp!r} is not in {settings.wecom_corps_file} and has not "
                                      "authorised the suite; add it to the corps file, or have it authorise first")
                await tag_through_wecom(client, producer, settings, args.corp, args.userid, args.customer, add, remove)
        finally:
            await producer.stop()
    asyncio.run(run())
    print(f"tagged {args.corp}:{args.customer} (staff {args.userid}): +{len(add)} -{len(remove)}; "
          f"the enrichment reports it")
    return 0


def cmd_reconcile(args, settings: Settings) -> int:
    from pathlib import Path
    from tqdm import tqdm
    from streams.replay.run import parse_time
    from streams.wecom.api import command_client
    from streams.wecom.corps import load_corps
    from streams.wecom.reconcile import reconcile
    corps = load_corps(settings)
    since_s = parse_time("--since", args.since) // 1000 if args.since else None
    _logging(settings)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with command_client(settings, corps, "tagstream-reconcile-auth") as client:
            unknown = [c for c in args.corp if not client.serves(c)]
            if unknown:
                raise ConfigError(f"--corp {unknown[0]!r} is not in {settings.wecom_corps_file} and has not "
                                  "authorised the suite")
            while not stop.is_set():
                with tqdm(unit=" relationships", disable=not sys.stderr.isatty()) as bar:
                    summary = await reconcile(settings, client, args.corp or client.corp_ids(),
                                              state_dir=Path(settings.reconcile_state_dir), since_s=since_s,
                                              progress_bar=bar)
                print(summary.render(), flush=True)
                if not settings.reconcile_every:
                    return
                print(f"next pass in {format_duration(settings.reconcile_every)} (TAGSTREAM_RECONCILE_EVERY)", flush=True)
                try:
                    await asyncio.wait_for(stop.wait(), settings.reconcile_every / 1000)
                except asyncio.TimeoutError:
                    pass
    asyncio.run(run())
    return 0


def cmd_load(args, settings: Settings) -> int:
    import itertools
    from streams.kafka.admin import ensure_topics
    from streams.sources.loadgen import TagTraffic
    from streams.kafka.producer import input_producer, produce

    if args.events < 0 or args.rate < 0:
        raise ConfigError("--events and --rate take a number >= 0 (e.g. --events 10000 --rate 2000)")

    async def run() -> None:
        await ensure_topics(settings)
        wall = lambda: int(time.time() * 1000)       # noqa: E731
        traffic = TagTraffic(args.seed, start_ms=wall(), clock=wall if args.rate else None)
        producer = input_producer(settings)
        await producer.start()
        try:
            rules = traffic.rules()
            if not args.no_rules:
                await produce(producer, settings, rules)
            started = time.monotonic()
            events, sent = traffic.events(), 0
            step = max(1, int(args.rate / 20)) if args.rate else max(args.events, 1)
            while sent < args.events:           # with --rate, in steps of 50 ms of traffic
                sent += await produce(producer, settings, itertools.islice(events, min(step, args.events - sent)))
                ahead = sent / args.rate - (time.monotonic() - started) if args.rate else 0
                if ahead > 0:
                    await asyncio.sleep(ahead)
            elapsed = time.monotonic() - started
            print(f"produced {len(rules) if not args.no_rules else 0} rules and {sent} events "
                  f"in {elapsed:.1f}s ({sent / max(elapsed, 1e-9):,.0f}/s)")
        finally:
            await producer.stop()

    asyncio.run(run())
    return 0


def _time_range(args, required: bool) -> tuple[Optional[int], Optional[int]]:
    from streams.replay.run import parse_time
    if required and not (args.from_time and args.to_time):
        raise ConfigError("give the range to replay: --from TIME --to TIME (ISO-8601, e.g. "
                          "--from 2026-11-01T00:00:00Z --to 2026-11-02T00:00:00Z), or --files ARCHIVE...")
    from_ms = parse_time("--from", args.from_time) if args.from_time else None
    to_ms = parse_time("--to", args.to_time) if args.to_time else None
    if from_ms is not None and to_ms is not None and from_ms >= to_ms:
        raise ConfigError(f"--from {args.from_time} is not before --to {args.to_time}")
    return from_ms, to_ms


def cmd_replay(args, settings: Settings) -> int:
    from streams.replay.run import ReplayOptions, run_replay
    from_ms, to_ms = _time_range(args, required=not args.files)
    options = ReplayOptions(from_ms, to_ms, args.files, args.dry_run, args.out, args.dead_letters, args.summary_json)
    summary = asyncio.run(run_replay(settings, options))
    print(summary.render())
    if args.dry_run:
        print(f"  reports written to {args.out}")
    if summary.dead_letters:
        print(f"  dead letters written to {args.dead_letters}")
    return 0


def cmd_archive(args, settings: Settings) -> int:
    from streams.replay.run import run_archive
    from_ms, to_ms = _time_range(args, required=True)
    counts = asyncio.run(run_archive(settings, from_ms, to_ms, args.out))
    print(f"archived to {args.out}: " + ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items())))
    return 0


def cmd_topics(args, settings: Settings) -> int:
    from streams.kafka.admin import ensure_topics
    created = asyncio.run(ensure_topics(settings))
    print("created: " + (", ".join(created) if created else "nothing (all topics exist)"))
    return 0


def cmd_lag(args, settings: Settings) -> int:
    from streams.kafka.connection import client_kwargs
    from streams.observability.lag import LagMonitor, monitored_groups
    groups = monitored_groups(settings)
    if args.group:
        if args.group not in groups:
            raise ConfigError(f"--group {args.group!r}: tagstream's groups are {', '.join(groups)}")
        groups = {args.group: groups[args.group]}

    async def sample():
        async with LagMonitor(client_kwargs(settings), groups) as monitor:
            return await monitor.sample()
    rows = asyncio.run(sample())
    if not rows:
        print(f"no topics yet for {', '.join(groups)}: create them with `tagstream topics`", file=sys.stderr)
        return 1
    now_ms = int(time.time() * 1000)
    width = max(len(r.group) for r in rows) + 1
    topic_width = max(len(r.topic) for r in rows) + 1
    print(f"{'GROUP':<{width}} {'TOPIC':<{topic_width}} {'PARTITION':>9} {'CURRENT-OFFSET':>15} "
          f"{'LOG-END-OFFSET':>15} {'LAG':>8} {'LAG-SECONDS':>12}")
    for row in rows:
        current = "-" if row.committed is None else str(row.committed)
        print(f"{row.group:<{width}} {row.topic:<{topic_width}} {row.partition:>9} {current:>15} "
              f"{row.log_end:>15} {row.lag:>8} {row.lag_seconds(now_ms):>12.1f}")
    return 0


def cmd_topology(args, settings: Settings) -> int:
    from streams.topology import build_topology
    print(build_topology(settings).describe())
    return 0


def cmd_settings(args, settings: Settings) -> int:
    if args.markdown:
        print(settings_markdown(), end="")
        return 0
    for variable, default, help_text in Settings.describe():
        print(f"{variable:<36} {default:<26} {help_text}")
    return 0


def settings_markdown() -> str:
    """docs/configuration.md, generated from the settings themselves."""
    rows = "\n".join(
        f"| `--{variable[len('TAGSTREAM_'):].lower().replace('_', '-')}` | `{variable}` | `{default or '(none)'}` "
        f"| {help_text.replace('|', '/')} |"
        for variable, default, help_text in Settings.describe())
    return f"""# Configuration

<!-- Generated by `tagstream settings --markdown` (`make docs`); edit streams/settings.py instead.
     tests/unit/test_settings.py fails when this page is stale. -->

Every part of tagstream (worker, sink, replay, the demo, the lag command) reads one typed
`Settings` object (`streams/settings.py`). Each setting is a flag of every `tagstream`
command and a `TAGSTREAM_*` environment variable; a flag wins over the environment.
Durations take a unit (`500ms`, `30s`, `10m`, `2h`, `7d`); a bare number is milliseconds. A bad value stops the command with
one line that says how to fix it:

```
$ tagstream worker --partitions x
tagstream: error: --partitions='x': expected an integer, e.g. --partitions=4
```

`tagstream settings` prints the same list on a terminal.

| flag | variable | default | what it does |
|---|---|---|---|
{rows}
"""


def cmd_run(args, settings: Settings) -> int:
    from streams.cli.demo import run_demo
    rate = args.rate if args.rate is not None else (50 if args.via_wecom else 0 if args.events else 1000)
    return run_demo(settings, events=args.events, rate=rate, seed=args.seed,
                    reports_file=args.reports_file, via_wecom=args.via_wecom)


def cmd_explain(args, settings: Settings) -> int:
    import time as _time
    from streams.explain.run import run_explain
    from streams.replay.run import parse_time
    to_ms = parse_time("--to", args.to_time) if args.to_time else int(_time.time() * 1000)
    from_ms = parse_time("--from", args.from_time) if args.from_time else to_ms - settings.dedupe_horizon
    return asyncio.run(run_explain(settings, args.customer, from_ms, to_ms, args.json))


def cmd_rules(args, settings: Settings) -> int:
    from streams.rules.run import cmd_rules as run
    return run(args, settings)


COMMANDS = {"run": cmd_run, "worker": cmd_worker, "sink": cmd_sink, "ingest": cmd_ingest, "enrich": cmd_enrich, "tag": cmd_tag, "reconcile": cmd_reconcile,
            "rules": cmd_rules, "explain": cmd_explain,
            "load": cmd_load,
            "replay": cmd_replay, "archive": cmd_archive,
            "topics": cmd_topics, "lag": cmd_lag, "topology": cmd_topology, "settings": cmd_settings}

if __name__ == "__main__":
    sys.exit(main())
