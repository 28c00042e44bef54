"""The machine gauge log: readings around runs, and the report comparing the kept runs."""

import pytest

from benchmarks.simlab.gauge import GaugeLog, gauge_report
from tests.simlab.test_rounds import FakeGauge


def test_gauge_log_rates_a_run_by_the_readings_on_both_sides() -> None:
    log = GaugeLog(FakeGauge([(100.0, 30.0), (100.0, 50.0), (120.0, 50.0)]))
    log.mark("a")
    log.mark("b")
    with pytest.raises(ValueError, match="close"):
        log.around("b")  # nothing read after b yet
    log.close()
    assert log.around("a") == (100.0, 40.0)  # the state flipped during a
    assert log.around("b") == (110.0, 50.0)
    assert log.readings() == [(100.0, 30.0), (100.0, 50.0), (120.0, 50.0)]
    with pytest.raises(ValueError, match="already"):
        log.mark("a")


def test_gauge_report_compares_the_kept_runs() -> None:
    kept_cal = [(100.0, 40.0), (110.0, 44.0), (90.0, 36.0)]
    kept_val = [(121.0, 40.0)]
    every = [*kept_cal, *kept_val, (60.0, 20.0)]
    report = gauge_report(kept_cal, kept_val, every)
    assert report["calibration"] == [100.0, 40.0] and report["validation"] == [121.0, 40.0]
    assert report["low"] == [60.0, 20.0] and report["high"] == [121.0, 44.0]
    assert "(+21%, +0%)" in report["line"] and "5 readings 60-121 GFLOP/s" in report["line"]
