"""make bench-safety's whole path on tiny models: the published sizes are too heavy for the
suite, the code measuring them is not."""

from __future__ import annotations

from bench import safety_cpu


def test_the_safety_bench_times_both_checkers_at_each_batch() -> None:
    results = safety_cpu.measure(smoke=True, repeat=1)
    rows = results["rows"]
    assert [(row["checker"], row["batch"]) for row in rows] == [
        (name, batch) for name in safety_cpu.checkers(smoke=True) for batch in safety_cpu.BATCHES
    ]
    assert all(row["ms"] > 0 and row["parameters_m"] > 0 for row in rows)
    assert results["image_side"] == 64
    table = safety_cpu.markdown(results)
    assert table.count("\n| ") == 1 + len(rows)  # the header's separator, then a row each
