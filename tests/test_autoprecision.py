"""autoprecision.py: ``--precision auto`` on a CPU chosen by timing the model's own step, once per
machine, torch version and shape, kept in the cache folder; a damaged cache is measured anew."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ddpm import autoprecision, runtime
from ddpm.autoprecision import MARGIN, cache_key, choose, measure

from conftest import ddpm_in_process


class Clock:
    """A timer that moves only when a fake step runs: each precision's step takes the seconds
    given, so the measurement's arithmetic is exact."""

    def __init__(self, fp32_s: float, bf16_s: float):
        self.now, self.cost, self.calls = 0.0, {"fp32": fp32_s, "bf16": bf16_s}, []

    def __call__(self) -> float:
        return self.now

    def make_step(self, precision: str):
        def step() -> None:
            self.calls.append(precision)
            self.now += self.cost[precision]
        return step


@pytest.mark.parametrize("fp32_s, bf16_s, expected", [
    (0.30, 0.10, "bf16"),  # bf16 3x faster
    (0.10, 0.14, "fp32"),  # bf16 slower, as on a Xeon whose bf16 matmul is half fp32's
    (0.10, 0.10 / (MARGIN - 0.01), "fp32"),  # faster, but by less than the margin
    (0.10, 0.10 / (MARGIN + 0.01), "bf16"),
])
def test_the_faster_precision_is_chosen_by_the_margin(fp32_s, bf16_s, expected):
    clock = Clock(fp32_s, bf16_s)
    found = measure(clock.make_step, budget_s=10.0, rounds=3, timer=clock)
    assert (found.fp32_s, found.bf16_s) == pytest.approx((fp32_s, bf16_s))
    assert found.precision == expected
    assert found.speedup == pytest.approx(fp32_s / bf16_s)
    # one untimed warm-up each, then rounds that alternate the two
    assert clock.calls == ["fp32", "bf16"] + ["fp32", "bf16"] * 3
    assert found.why() == f"auto: {expected}, bf16 measured {fp32_s / bf16_s:.2f}x fp32 here"


def test_the_fastest_step_counts_and_the_budget_ends_the_rounds():
    clock = Clock(0.2, 0.1)
    slow_spell = iter([0.0, 0.0, 5.0])  # the machine was busy during the first timed fp32 step
    step = clock.make_step

    def make_step(precision):
        inner = step(precision)

        def timed():
            inner()
            if precision == "fp32":
                clock.now += next(slow_spell, 0.0)
        return timed

    found = measure(make_step, budget_s=1.0, rounds=50, timer=clock)
    assert found.fp32_s == pytest.approx(0.2) and found.bf16_s == pytest.approx(0.1)
    # the slow first round spent the budget: the second round is the last (two at least)
    assert clock.calls.count("fp32") == 3


def test_a_cached_choice_is_used_without_measuring_and_each_key_is_its_own(tmp_path, monkeypatch):
    clock = Clock(0.3, 0.1)
    shape = {"model": {"base_channels": 16}, "batch": 64}
    first = choose("train", shape, clock.make_step, cache_dir=tmp_path, timer=clock)
    assert first.precision == "bf16" and len(clock.calls) > 0
    records = json.loads((tmp_path / "precision.json").read_text())
    (record,) = records.values()
    assert record["key"] == cache_key("train", shape) and record["precision"] == "bf16"
    assert record["fp32_s"] == pytest.approx(0.3) and record["bf16_s"] == pytest.approx(0.1)

    # the same key again: read back, nothing timed, the same answer (deterministic)
    never = Clock(0.1, 0.5)
    assert choose("train", shape, never.make_step, cache_dir=tmp_path, timer=never) == first
    assert never.calls == []

    # a change of any part of the key measures again, and both answers are kept
    changes = [("sample", shape, {}), ("train", {**shape, "batch": 128}, {}),
               ("train", shape, {"torch": "9.9.9"}), ("train", shape, {"threads": 7}),
               ("train", shape, {"cpu": "another CPU"}), ("train", shape, {"bf16_flag": "amx_bf16"})]
    real_machine = autoprecision.machine
    for use, changed_shape, machine_change in changes:
        monkeypatch.setattr(autoprecision, "machine", lambda m=machine_change: {**real_machine(), **m})
        again = Clock(0.1, 0.5)
        chosen = choose(use, changed_shape, again.make_step, cache_dir=tmp_path, timer=again)
        assert chosen.precision == "fp32"
        assert again.calls, (use, changed_shape, machine_change)
    monkeypatch.setattr(autoprecision, "machine", real_machine)
    assert len(json.loads((tmp_path / "precision.json").read_text())) == 1 + len(changes)
    assert choose("train", shape, never.make_step, cache_dir=tmp_path, timer=never) == first


@pytest.mark.parametrize("damage", [b"\x00\xff garbage", b'{"cut": {"key"', b"[1, 2, 3]",
                                    b'{"x": "not a record"}', b"[" * 100_000])
def test_a_damaged_cache_is_measured_again_with_a_warning(tmp_path, damage):
    (tmp_path / "precision.json").write_bytes(damage)
    clock = Clock(0.1, 0.2)
    with pytest.warns(UserWarning, match="precision cache .*precision.json.*measuring again"):
        found = choose("train", {"batch": 1}, clock.make_step, cache_dir=tmp_path, timer=clock)
    assert found.precision == "fp32" and clock.calls
    # written anew, whole: the next call reads it
    never = Clock(9.0, 9.0)
    assert choose("train", {"batch": 1}, never.make_step, cache_dir=tmp_path, timer=never) == found
    assert never.calls == []


def test_a_record_with_impossible_times_is_measured_again(tmp_path):
    clock = Clock(0.1, 0.2)
    choose("train", {"batch": 1}, clock.make_step, cache_dir=tmp_path, timer=clock)
    path = tmp_path / "precision.json"
    records = json.loads(path.read_text())
    for record in records.values():
        record["bf16_s"] = -1.0
    path.write_text(json.dumps(records))
    again = Clock(0.3, 0.1)
    assert choose("train", {"batch": 1}, again.make_step, cache_dir=tmp_path, timer=again).precision == "bf16"
    assert again.calls


def test_a_cache_that_cannot_be_written_warns_and_still_chooses(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    clock = Clock(0.3, 0.1)
    with pytest.warns(UserWarning, match="cannot write the precision cache"):
        found = choose("train", {"batch": 1}, clock.make_step, cache_dir=blocker / "ddpm", timer=clock)
    assert found.precision == "bf16" and blocker.read_text() == "not a folder"


def test_auto_measures_only_on_a_cpu_with_bf16_instructions(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    asked = []

    def probe():
        asked.append(1)
        return "bf16", "auto: bf16, bf16 measured 1.60x fp32 here"

    monkeypatch.setattr(runtime, "cpu_bf16_flag", lambda: None)
    assert runtime.precision_and_reason("auto", cpu, probe) == (
        "fp32", "auto: fp32, this CPU has no bf16 hardware")
    assert runtime.precision_and_reason("auto", cuda, probe) == ("bf16", "auto: bf16 on CUDA")
    assert runtime.precision_and_reason("bf16", cpu, probe) == ("bf16", "as asked")
    assert asked == []
    monkeypatch.setattr(runtime, "cpu_bf16_flag", lambda: "avx512_bf16")
    assert runtime.precision_and_reason("auto", cpu, probe)[0] == "bf16" and asked == [1]
    assert runtime.precision_and_reason("fp32", cpu, probe) == ("fp32", "as asked") and asked == [1]
    # nothing to measure (no model): the exact precision
    assert runtime.precision_and_reason("auto", cpu) == (
        "fp32", "auto: fp32, bf16 (avx512_bf16) not measured for this model")


def _write_choice(cache_dir, use, shape, fp32_s, bf16_s):
    """A cache holding one measurement, as a run on another day would have left it."""
    key = cache_key(use, shape)
    record = {"key": key, "fp32_s": fp32_s, "bf16_s": bf16_s}
    (cache_dir / "precision.json").write_text(json.dumps({autoprecision._digest(key): record}))


@pytest.mark.parametrize("fp32_s, bf16_s", [(0.07, 0.1), (0.1, 0.05)])
def test_a_run_trains_in_the_cached_choice_and_says_what_was_measured(
        fake_fashion, tmp_path, monkeypatch, fp32_s, bf16_s):
    from ddpm import get_preset, with_overrides
    from ddpm.train import training_probe

    monkeypatch.setattr(runtime, "cpu_bf16_flag", lambda: "avx512_bf16")
    cache = tmp_path / "cache"
    cache.mkdir()
    config = with_overrides(get_preset("tiny"), {"data": {"data_dir": str(fake_fashion),
                                                          "cache_dir": str(cache)}})
    shape = {"model": config.to_dict()["model"], "batch": config.train.batch_size,
             "channels_last": False}
    _write_choice(cache, "train", shape, fp32_s, bf16_s)
    expected = "bf16" if fp32_s / bf16_s >= MARGIN else "fp32"
    assert training_probe(config, torch.device("cpu"))() == (
        expected, f"auto: {expected}, bf16 measured {fp32_s / bf16_s:.2f}x fp32 here")
    r = ddpm_in_process("train", "--preset", "tiny", "--data-dir", fake_fashion, "--cache-dir",
                        cache, "--steps", 1, "--sample-every", 0, "--no-progress",
                        "--out", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert (f"{expected} (auto: {expected}, bf16 measured {fp32_s / bf16_s:.2f}x fp32 here)"
            in r.stdout), r.stdout
    assert len(json.loads((cache / "precision.json").read_text())) == 1, "read, not measured"


def test_the_measurement_leaves_the_run_as_it_would_have_been(fake_fashion, tmp_path, monkeypatch):
    """Measuring (fresh, no cache) changes neither the run's random draws nor torch's threads:
    the weights after a step are those of a run in the same precision that measured nothing."""
    from ddpm import get_preset, train, with_overrides
    from ddpm.checkpoint import load_run_or_file

    monkeypatch.setattr(runtime, "cpu_bf16_flag", lambda: "avx512_bf16")
    base = {"data": {"data_dir": str(fake_fashion), "cache_dir": str(tmp_path / "cache")},
            "train": {"steps": 1, "sample_every": 0}}
    train(with_overrides(get_preset("tiny"), base), tmp_path / "auto", progress=False, final_grid=False)
    record = next(iter(json.loads((tmp_path / "cache/precision.json").read_text()).values()))
    chosen = record["precision"]
    assert math.isfinite(record["fp32_s"]) and chosen in ("fp32", "bf16")
    threads = torch.get_num_threads()
    plain = with_overrides(get_preset("tiny"), {**base, "train": {**base["train"], "precision": chosen}})
    train(plain, tmp_path / "plain", progress=False, final_grid=False)
    assert torch.get_num_threads() == threads
    a, b = (load_run_or_file(tmp_path / name)[1]["model"] for name in ("auto", "plain"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bench_reports_both_rates_and_autos_choice(capsys, tmp_path, monkeypatch):
    from ddpm.cli import main

    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path))
    assert main(["bench", "--preset", "tiny", "--seconds", "0.2", "--sample-batch-size", "4",
                 "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(r["rates"]) >= {"fp32", "bf16"}
    assert all(r["rates"][p][use] > 0 for p in ("fp32", "bf16") for use in ("train", "sample"))
    assert r["train_images_per_s"] == r["rates"][r["precision"]]["train"]
    assert r["sample_images_per_s"] == r["rates"][r["sample_precision"]]["sample"]
    if runtime.cpu_bf16_flag():
        assert "bf16 measured" in r["precision_why"] and "bf16 measured" in r["sample_precision_why"]
        uses = {rec["key"]["use"] for rec in json.loads((tmp_path / "precision.json").read_text()).values()}
        assert uses == {"train", "sample"}
    else:
        assert r["precision_why"] == r["sample_precision_why"] == "auto: fp32, this CPU has no bf16 hardware"
