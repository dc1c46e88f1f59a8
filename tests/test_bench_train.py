"""scripts.bench_train end to end on CPU: its own synthetic dataset, a depth-1 model, a few steps (a smoke test;
the numbers themselves are not timed against anything)."""

import math

from scripts import bench_train


def test_bench_train_prints_its_rows_and_grouping_pads_less(capsys):
    assert bench_train.main(["--device", "cpu", "--synthetic-studies", "300", "--depth", "1", "--steps", "3",
                             "--warmup-steps", "1", "--total-batch-size", "8", "--device-batch-size", "4",
                             "--dtype", "fp32", "--compare-dtype"]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| run ")]
    rows = {}
    for line in table:
        name, tps, ratio, pad, mfu, mem, epoch = [c.strip() for c in line.strip("|").split("|")]
        rows[name] = dict(tps=float(tps.replace(",", "")), ratio=float(ratio.rstrip("x")),
                          pad=float(pad.rstrip("%")) / 100, mfu=mfu, mem=float(mem.replace(",", "")),
                          epoch=float(epoch.split()[0].replace(",", "")))
    assert list(rows) == ["grouped", "baseline: random batches", "grouped, bf16"], out
    for r in rows.values():
        assert math.isfinite(r["tps"]) and r["tps"] > 0
        assert 0 <= r["pad"] < 1
        assert r["mfu"] == "n/a"  # no known peak FLOPs on a CPU
        assert r["mem"] > 0 and r["epoch"] > 0
    assert rows["baseline: random batches"]["ratio"] == 1.0
    assert rows["grouped"]["pad"] < rows["baseline: random batches"]["pad"]
    assert rows["grouped, bf16"]["pad"] == rows["grouped"]["pad"]  # the same batches, only the precision differs
