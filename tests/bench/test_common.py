"""bench/common.py: the A/B alternation the ratios rely on, the table, and the dated BENCHMARKS.md appender."""

import datetime
import os

import pytest

from .conftest import load_bench

common = load_bench("common")


def test_alternate_interleaves_after_warmup():
    calls = []
    times = common.alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert [len(v) for v in times.values()] == [3, 3]
    assert all(t >= 0 for v in times.values() for t in v)


def test_alternate_rejects_no_rounds():
    with pytest.raises(ValueError, match="rounds"):
        common.alternate({"a": lambda: None}, rounds=0)


def test_table_and_ragged_row():
    assert common.table(["x", "y"], [[1, "2.0x"]]) == "| x | y |\n| --- | --- |\n| 1 | 2.0x |"
    with pytest.raises(ValueError, match="2 columns"):
        common.table(["x", "y"], [[1]])


def test_append_section_keeps_existing_text(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\nearlier section\n")
    common.append_section("train step", "| a |\n| --- |", path=str(path))
    text = path.read_text()
    assert text.startswith("# Benchmarks\n\nearlier section\n")
    assert f"## train step ({datetime.date.today().isoformat()})\n\n| a |\n| --- |\n" in text


def test_machine_names_cores():
    assert f"{os.cpu_count()} cores" in common.machine()


def test_alternate_pauses_before_each_timed_call_only():
    # the idle pause is outside the timed region: a no-op fn still times as (almost) nothing
    times = common.alternate({"a": lambda: None}, rounds=2, warmup=0, pause=0.05)
    assert all(t < 0.05 for t in times["a"])
    with pytest.raises(ValueError, match="pause"):
        common.alternate({"a": lambda: None}, pause=-1)
