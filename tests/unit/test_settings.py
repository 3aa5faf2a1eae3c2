"""One typed settings object: defaults, TAGSTREAM_* overrides, flags, one-line errors."""
import pytest

from streams.settings import ConfigError, Settings


def test_defaults_match_the_spec():
    s = Settings.load(environ={})
    assert s.broker == "kafka://127.0.0.1:9092"
    assert s.topic("tag_events_topic") == "tagstream.tag-events"
    assert s.topic("conversion_reports_topic") == "tagstream.conversion-reports"
    assert (s.order_window, s.delay_hold, s.idle_grace, s.dedupe_horizon) == (
        7 * 86_400_000, 30 * 60_000, 5 * 60_000, 7 * 86_400_000)
    assert s.default_action_types["LONG_TERM"] == "CUSTOM"


def test_environment_then_flags():
    s = Settings.load(overrides={"partitions": "16"},
                      environ={"TAGSTREAM_DELAY_HOLD": "10m", "TAGSTREAM_PARTITIONS": "8",
                               "TAGSTREAM_TOPIC_PREFIX": "acme.", "TAGSTREAM_BROKER": "kafka://k1:9092,kafka://k2:9092"})
    assert s.delay_hold == 600_000
    assert s.partitions == 16
    assert s.topic("dead_letters_topic") == "acme.dead-letters"
    assert s.bootstrap_servers == "k1:9092,k2:9092"


@pytest.mark.parametrize("variable, value, fragment", [
    ("TAGSTREAM_PARTITIONS", "many", "expected an integer, e.g. TAGSTREAM_PARTITIONS=4"),
    ("TAGSTREAM_ORDER_WINDOW", "a week", "e.g. TAGSTREAM_ORDER_WINDOW=7d"),
    ("TAGSTREAM_PARTITIONS", "0", "must be at least 1"),
    ("TAGSTREAM_LOG_LEVEL", "loud", "use debug, info, warning or error"),
])
def test_bad_values_give_a_one_line_error_that_says_how_to_fix_it(variable, value, fragment):
    with pytest.raises(ConfigError) as caught:
        Settings.load(environ={variable: value})
    message = str(caught.value)
    assert fragment in message and "\n" not in message


def test_settings_round_trip_through_the_environment_of_a_child_process():
    s = Settings.load(overrides={"app_id": "x", "delay_hold": "45s"}, environ={})
    assert Settings.load(environ=s.to_environ()) == s


def test_the_configuration_page_is_generated_from_the_settings_and_current():
    from pathlib import Path

    from streams.cli.main import settings_markdown
    page = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    assert page == settings_markdown(), "docs/configuration.md is stale: run `make docs`"
    for variable, default, _ in Settings.describe():
        assert f"`{variable}`" in page
