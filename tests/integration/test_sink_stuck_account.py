"""One account that the Marketing API answers "busy" (10001) on every request must not hold
back the others (SPEC §5, issue 18 part 4): the sink parks its reports on the retry topic
and keeps the other accounts flowing, then delivers the parked ones once the account
recovers, each exactly once, SIGKILLs of the sink included.

Given a sink with a 2 s retry budget and a 3 s retry delay, 23 accounts, one of them stuck,
3% retryable answers elsewhere and a few reports the API rejects for good, with reports
written live in waves:
- every other account's report is accepted within a few seconds of being written,
  while the stuck account gets none through;
- the stuck account's reports are parked on the retry topic (same partition number, with
  their attempt and original timestamp), the sink shows them (`tagstream_sink_parked_reports`,
  and their age in `tagstream_sink_oldest_unacknowledged_report_age_seconds`), its offsets on
  conversion-reports are past them, and the stuck account costs one budget, then one request
  per retry delay;
- the rejected reports are on report-failures meanwhile;
- once the account heals, its reports go out within two retry delays, and every id is
  accepted exactly once.
"""
from __future__ import annotations

import signal
import time
from collections import defaultdict

import orjson

from streams.observability.observe import scrape, total
from streams.sinks.parking import HEADER_ATTEMPT, HEADER_FIRST_TS
from tests import kafka_io
from tests.integration.conftest import Pipeline, SinkProcess, wait_until
from tests.marketing_api_server import Faults, MarketingApiServer, ServerThread
from tests.report_samples import sample_reports

TOKEN = "tok-stuck-account-4c1e"
STUCK = 2005                       # sample_reports spreads reports over accounts 2000-2022
BUDGET_S, DELAY_S = 2.0, 3.0
WAVES, PER_WAVE, WAVE_GAP_S = 16, 120, 0.5
#: how late another account's report may be accepted: one budget (the round that first
#: meets the stuck account waits it out), plus a round and the 3% retryable answers' backoff
OTHERS_BOUND_S = BUDGET_S + 3.0


class Scenario:
    def __init__(self, tmp_path, seed: int):
        # the rate limit out of the way: this is about the stuck account, not the token's budget
        self.pipeline = Pipeline(tmp_path, sink_retry_budget=int(BUDGET_S * 1000),
                                 sink_retry_delay=int(DELAY_S * 1000), sink_rate_limit=60_000)
        reports = sample_reports(50 + WAVES * PER_WAVE, seed=seed)
        self.warmup = [r for r in reports[:50] if r["account_id"] != STUCK]
        self.live = reports[50:]
        self.stuck = {r["outer_action_id"] for r in self.live if r["account_id"] == STUCK}
        others = [r["outer_action_id"] for r in self.live if r["account_id"] != STUCK]
        self.rejected = set(others[7::160])
        self.expected = {r["outer_action_id"] for r in self.warmup + self.live} - self.rejected
        self.server = MarketingApiServer(TOKEN, Faults(seed=seed, retryable_rate=0.03, permanent_ids=self.rejected,
                                                       stuck_accounts={STUCK}))
        self.api = ServerThread(self.server).start()
        self.token_file = tmp_path / "token"
        self.token_file.write_text(TOKEN)
        self.log = tmp_path / "sink.log"
        self.written_at: dict[str, float] = {}
        self.pipeline.create_topics()
        self.sink = self.start_sink()

    def start_sink(self) -> SinkProcess:
        return SinkProcess(self.pipeline, self.api.base_url, self.token_file, self.log).start()

    def write(self, reports: list[dict]) -> None:
        topic = self.pipeline.topic("conversion_reports")
        kafka_io.produce(kafka_io.json_record(topic, r["outer_action_id"], r) for r in reports)
        now = time.time()
        self.written_at.update({r["outer_action_id"]: now for r in reports})

    def waves(self):
        """Write the live reports, a wave every WAVE_GAP_S; yields after each wave."""
        for n in range(WAVES):
            self.write(self.live[n * PER_WAVE:(n + 1) * PER_WAVE])
            yield n
            time.sleep(WAVE_GAP_S)

    def metric(self, name: str, **labels: str) -> float:
        return total(scrape(self.sink.port), name, **labels)

    def accepted(self) -> set[str]:
        return set(self.server.accepted)

    def in_doubt_logged(self) -> int:
        return sum(int(line.split(" in doubt")[0].rsplit(" ", 1)[1])
                   for line in self.log.read_text().splitlines() if " in doubt" in line)

    def stop(self) -> None:
        self.sink.stop()
        self.api.stop()
        self.pipeline.stop(delete_topics=True)


def test_a_stuck_account_is_parked_while_the_others_flow_and_goes_out_once_healed(kafka_broker, tmp_path):
    s = Scenario(tmp_path, seed=4)
    settings = s.pipeline.settings
    try:
        s.write(s.warmup)                  # the group has joined and the record is loaded
        wait_until(lambda: s.accepted() >= {r["outer_action_id"] for r in s.warmup}, 120, "the warm-up", s.sink)
        started = time.time()
        for _ in s.waves():
            pass
        others = s.expected - s.stuck
        wait_until(lambda: s.accepted() >= others, 60, "the other accounts' reports", s.sink)
        lateness = sorted(s.server.accepted[i].at - s.written_at[i] for i in others if i in s.written_at)
        wait_until(lambda: s.metric("tagstream_sink_parked_reports") == len(s.stuck), 30,
                   "every report of the stuck account parked", s.sink)
        wait_until(lambda: kafka_io.group_lag(f"{settings.app_id}-sink", s.pipeline.topic("conversion_reports"),
                                              settings.partitions) == 0,
                   30, "the sink's offsets past the parked reports", s.sink)
        failures = s.pipeline.read("report_failures", until=lambda rs: len(rs) >= len(s.rejected), timeout=60)
        samples = scrape(s.sink.port)
        oldest_written = min(s.written_at[i] for i in s.stuck)
        age_seen, age_due = total(samples, "tagstream_sink_oldest_unacknowledged_report_age_seconds"), \
            time.time() - oldest_written
        stuck_requests = s.server.requests_by_account[STUCK]
        stuck_for = time.time() - started
        accepted_while_stuck = s.accepted()

        s.server.heal(STUCK)
        healed = time.time()
        wait_until(lambda: s.accepted() >= s.expected, 60, "the healed account's reports", s.sink)
        healed_in = max(s.server.accepted[i].at for i in s.stuck) - healed
        wait_until(lambda: s.metric("tagstream_sink_parked_reports") == 0, 30, "nothing parked", s.sink)
        age_after = s.metric("tagstream_sink_oldest_unacknowledged_report_age_seconds")
        parked_count = s.metric("tagstream_sink_reports_total", outcome="parked")
        time.sleep(2)                      # anything sent twice would arrive by now
        copies = s.pipeline.read("retry_reports", until=lambda rs: len(rs) >= len(s.stuck), timeout=30, settle=1)
        reports_read = s.pipeline.read("conversion_reports", until=lambda rs: len(rs) >= len(s.expected), timeout=30)
    finally:
        s.stop()

    # the other accounts flowed: each accepted within the bound of being written
    print(f"other accounts: {len(lateness)} reports, p50 {lateness[len(lateness) // 2]:.2f} s, "
          f"p99 {lateness[int(len(lateness) * 0.99)]:.2f} s, max {lateness[-1]:.2f} s; "
          f"stuck account: {stuck_requests} requests in {stuck_for:.1f} s, out {healed_in:.2f} s after healing")
    assert lateness[-1] <= OTHERS_BOUND_S, lateness[-10:]
    # ... while the stuck account got nothing through, its reports parked and shown with their age
    assert not accepted_while_stuck & s.stuck
    assert age_seen >= age_due - 1.5, (age_seen, age_due)
    assert parked_count == len(s.stuck)
    assert age_after < 5
    # one budget, then one request per retry delay (without the breaker every round of the
    # 16 waves would spend a budget of ~7 requests on it)
    assert stuck_requests <= 20 + 2 * stuck_for / DELAY_S, stuck_requests
    # the rejected ones were dead-lettered while the account was still stuck
    assert {orjson.loads(r.value)["outer_action_id"] for r in failures} == s.rejected
    # the parked copies: on the report's own partition number, with their attempt and original timestamp
    partition_of = {r.key.decode(): r.partition for r in reports_read}
    timestamp_of = {r.key.decode(): r.timestamp for r in reports_read}
    attempts = defaultdict(list)
    for copy in copies:
        oid, headers = copy.key.decode(), dict(copy.headers)
        assert oid in s.stuck and copy.partition == partition_of[oid]
        assert int(headers[HEADER_FIRST_TS]) == timestamp_of[oid]
        assert copy.value == orjson.dumps(next(r for r in s.live if r["outer_action_id"] == oid))
        attempts[oid].append(int(headers[HEADER_ATTEMPT]))
    assert set(attempts) == s.stuck
    assert all(sorted(a) == list(range(1, len(a) + 1)) for a in attempts.values())   # 1, 2, 3, ...
    assert max(len(a) for a in attempts.values()) >= 2          # refused again on retry, parked again
    # healed: out within two retry delays (the next probe, then the copies parked again
    # before it come due), every id exactly once
    assert healed_in <= 2 * DELAY_S + 3
    assert s.accepted() == s.expected
    assert sum(s.server.duplicates.values()) == 0


def test_sink_kills_while_reports_are_parked_lose_nothing_and_send_nothing_twice(kafka_broker, tmp_path):
    s = Scenario(tmp_path, seed=5)
    try:
        s.write(s.warmup)
        wait_until(lambda: s.accepted() >= {r["outer_action_id"] for r in s.warmup}, 120, "the warm-up", s.sink)
        kills = 0
        for n in s.waves():
            if n in (4, 10):                # mid-run, with reports parked and more arriving
                wait_until(lambda: s.metric("tagstream_sink_reports_total", outcome="parked") > 0, 30,
                           "a parked report", s.sink)
                s.sink.stop(signal.SIGKILL)
                kills += 1
                s.sink = s.start_sink()
        wait_until(lambda: s.accepted() >= s.expected - s.stuck, 120, "the other accounts' reports", s.sink)
        wait_until(lambda: s.metric("tagstream_sink_parked_reports") == len(s.stuck), 60,
                   "every report of the stuck account parked", s.sink)
        accepted_while_stuck = s.accepted()
        s.sink.stop(signal.SIGKILL)         # a third kill, with everything parked and retries going on
        time.sleep(DELAY_S)
        s.sink = s.start_sink()
        kills += 1
        # restarted, the sink knows what is parked from the record alone
        wait_until(lambda: s.metric("tagstream_sink_parked_reports") == len(s.stuck), 60,
                   "the parked reports after the restart", s.sink)
        s.server.heal(STUCK)
        wait_until(lambda: s.accepted() >= s.expected, 60, "the healed account's reports", s.sink)
        wait_until(lambda: s.metric("tagstream_sink_parked_reports") == 0, 30, "nothing parked", s.sink)
        time.sleep(2)
        failures = s.pipeline.read("report_failures", until=lambda rs: len(rs) >= len(s.rejected), timeout=60,
                                   settle=1)
    finally:
        s.stop()
    print(f"{kills} kills: {sum(s.server.duplicates.values())} duplicate deliveries, "
          f"{s.in_doubt_logged()} in-doubt ids logged at restarts")
    assert kills == 3
    assert not accepted_while_stuck & s.stuck
    assert s.accepted() == s.expected
    # The stuck account's reports never had a request answered before the heal, so none of
    # them can be in doubt: each went out exactly once. Elsewhere a kill may leave a request
    # in doubt (the documented window, deduped by the API on outer_action_id).
    assert not set(s.server.duplicates) & s.stuck
    assert sum(s.server.duplicates.values()) <= s.in_doubt_logged()
    assert {orjson.loads(r.value)["outer_action_id"] for r in failures} == s.rejected
