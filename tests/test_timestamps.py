"""Timestamps read from PostgreSQL by ``shared.db``'s converters (the C parser of
``datetime.fromisoformat``, pg8000's own converter for what it refuses), against the text a real
PostgreSQL writes, in time zones with whole-hour, half-hour and pre-1900 local-mean-time offsets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pg8000 import converters

from shared.db import engine_for, timestamp_in, timestamptz_in

# UTC; +05:30 (+05:21:10 before 1942); -03:30 (-03:30:52 before 1935); +12:45 (+12:13:48 before 1868);
# Amsterdam's local mean time before 1892 (+00:17:30); Paris's before 1911 (+00:09:21): offsets with
# minutes, which pg8000's strptime cannot read, and offsets with seconds, which dateutil cannot either.
ZONES = ("UTC", "Asia/Kolkata", "America/St_Johns", "Pacific/Chatham", "Europe/Amsterdam", "Europe/Paris")
INSTANTS = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)  # a day in from each end: in a zone east or west of UTC the local date may cross year 1 or 9999


@pytest.fixture(scope="module")
def driver(servers):
    """A pg8000 connection of an engine without shared.db's listeners (pg8000's own converters)."""
    engine = sa.create_engine(servers["database_url"], poolclass=sa.pool.NullPool)
    connection = engine.raw_connection()
    yield connection.cursor()
    connection.close()
    engine.dispose()


def as_text(driver, zone: str, instants: list[datetime]) -> list[str]:
    """How PostgreSQL writes each instant as a timestamptz in ``zone`` (its default DateStyle, ISO)."""
    driver.execute("SELECT set_config('TimeZone', %s, false)", (zone,))
    driver.execute(
        "SELECT CAST(CAST(t AS timestamptz) AS text)"
        " FROM unnest(CAST(%s AS text[])) WITH ORDINALITY AS u(t, n) ORDER BY n",
        ([i.isoformat() for i in instants],),
    )
    return [r[0] for r in driver.fetchall()]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(zone=st.sampled_from(ZONES), instants=st.lists(INSTANTS, min_size=1, max_size=40))
def test_every_timestamptz_postgresql_writes_reads_back_as_the_same_instant_and_offset(
    driver, zone, instants
):
    for instant, text in zip(instants, as_text(driver, zone, instants), strict=True):
        ours = timestamptz_in(text)
        assert ours == instant, text
        theirs = converters.timestamptz_in(text)
        if isinstance(theirs, datetime):  # pg8000 read it too: the same instant, at the same offset
            assert (ours, ours.utcoffset()) == (theirs, theirs.utcoffset()), text
        else:  # pg8000 returned the text itself (an offset in seconds): ours is the instant, at that offset
            assert ours.isoformat(sep=" ").startswith(text[:19]), text


@pytest.mark.parametrize(
    "text",
    [
        "infinity",
        "-infinity",
        "0044-03-15 12:00:00+00 BC",
        "10000-01-01 00:00:00+00",
        "2026-12-01 20:10:17.5+00",
    ],
)
def test_what_the_c_parser_refuses_is_read_as_pg8000_reads_it(text):
    assert repr(timestamptz_in(text)) == repr(converters.timestamptz_in(text))


@pytest.mark.parametrize("text", ["infinity", "2026-12-01 20:10:17.123456", "2026-12-01 20:10:17"])
def test_a_timestamp_without_time_zone_is_read_as_pg8000_reads_it(text):
    assert repr(timestamp_in(text)) == repr(converters.timestamp_in(text))


def test_the_engines_connections_read_timestamps_with_these_converters(servers):
    engine = engine_for(servers["database_url"])
    with engine.connect() as conn:
        conn.exec_driver_sql("SET TimeZone = 'Europe/Paris'")
        value = conn.exec_driver_sql("SELECT CAST('1900-06-01 12:00:00+00' AS timestamptz)").scalar()
        pg = conn.connection.driver_connection
        assert (pg.pg_types[converters.TIMESTAMPTZ], pg.pg_types[converters.TIMESTAMP]) == (
            timestamptz_in,
            timestamp_in,
        )
        conn.rollback()
    # pg8000's own converter gave back the text '1900-06-01 12:09:21+00:09:21' here.
    assert value == datetime(1900, 6, 1, 12, tzinfo=UTC)
    assert value.utcoffset() == timedelta(minutes=9, seconds=21)
