"""benchmarks/gpu_check.py fits one device lease (issue 21): its planned stages add up to at most
8 minutes, the essential figures come first, and the schedule gets what the others leave."""
import argparse
import os
import sys

import pytest

from conftest import ROOT, run_script

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import gpu_check  # noqa: E402


def test_plan_fits_eight_minutes_with_the_checks_first():
    plan = gpu_check.planned(argparse.Namespace(smoke=False, budget=gpu_check.PLANNED_TOTAL_S))
    assert gpu_check.PLANNED_TOTAL_S == 480
    assert [name for name, _ in plan] == ["env", "correctness", "speed bf16", "speed fp32", "schedule"]
    # the schedule keeps most of the lease: 480 - (20 + 60 + 70 + 70) = 260 s
    assert dict(plan)["schedule"] == 260


@pytest.mark.parametrize("budget", [None, 300])
def test_every_stage_running_out_of_time_still_ends_within_the_budget(tmp_path, monkeypatch, capsys, budget):
    """The worst case: each stage's process uses all the time it is given. A fake clock advances
    by each limit handed to a stage; the run must end within --budget (default 480 s)."""
    clock = [1000.0]
    limits = []

    def fake_run(cmd, seconds, log, stamp_to=None):
        limits.append((os.path.basename(cmd[1]), seconds))
        clock[0] += max(seconds, 1)
        return "timeout", [], max(seconds, 1)

    monkeypatch.setattr(gpu_check.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(gpu_check, "_run", fake_run)
    argv = ["gpu_check.py", "--out", str(tmp_path / "out"), "--device", "cpu", "--data-root", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv + ([] if budget is None else ["--budget", str(budget)]))
    with pytest.raises(SystemExit):  # env and correctness "timed out": a failed run
        gpu_check.main()
    total = budget or 480
    assert clock[0] - 1000.0 <= total
    assert [name for name, _ in limits] == ["gpu_check.py", "gpu_check.py", "train_speed.py", "train_speed.py",
                                            "dcdh_train.py"]
    assert [round(sec) for _, sec in limits[:4]] == [20, 60, 70, 70]


def test_a_smaller_budget_shortens_only_the_schedule():
    plan = dict(gpu_check.planned(argparse.Namespace(smoke=False, budget=300)))
    assert plan["schedule"] == 80 and plan["correctness"] == 60


def test_a_budget_without_room_for_the_schedule_is_refused():
    r = run_script("benchmarks/gpu_check.py", "--smoke", "--budget", "100", "--out", os.devnull, timeout=60)
    assert r.returncode == 2 and "--budget 100: too small" in r.stderr


def test_schedule_summary_of_a_run_cut_by_the_time_limit():
    lines = [(10.0, "[config] dataset ddh ..."), (12.0, "[epoch 1/600] loss 2.0, 9000 images/s"),
             (13.0, "[epoch 2/600] loss 1.5, 9000 images/s"), (14.5, "[evaluate epoch 2] mAP 3.25%, tie-aware ..."),
             (15.0, "[epoch 3/600] loss 1.2, 9000 images/s")]
    out = gpu_check.schedule_summary(lines, "timeout")
    assert (out["epochs_done"], out["epochs_planned"], out["finished"]) == (3, 600, False)
    assert out["last_map_percent"] == 3.25
    # 1.5 s per epoch from epoch 1 (at 12 s) to 3 (at 15 s): 12 + 1.5 * 599 = 910.5 s
    assert out["seconds_per_epoch"] == 1.5 and out["extrapolated_all_epochs_min"] == pytest.approx(910.5 / 60, abs=0.01)


def test_schedule_summary_of_a_finished_run():
    lines = [(1.0, "[epoch 1/2] loss 2.0"), (2.0, "[epoch 2/2] loss 1.0"),
             (2.5, "[evaluate epoch 2] mAP 41.50%, tie-aware mAP 41.00%"), (2.6, "[done] 2 epoch(s) in 2s")]
    out = gpu_check.schedule_summary(lines, 0)
    assert out["finished"] and out["last_map_percent"] == 41.5 and "seconds_per_epoch" not in out
    assert not gpu_check.schedule_summary(lines, 1)["finished"]
