"""The preprocessing-against-a-loop benchmark's arithmetic: the floor that says how far any workflow could go."""

import math

from conftest import load_benchmark

bench = load_benchmark("preprocess_vs_loop")


def run_figures(loop_wall_s: float, cores: int) -> dict:
    """One run's figures as the benchmark writes them: two stages the loop ran, QC that only the workflow runs."""
    stages = [
        {"stage": "stripped", "threads": 2, "workflow_job_s": 30.0, "loop_s": 12.0, "loop_cpu_s": 22.0},
        {"stage": "n4", "threads": 1, "workflow_job_s": 50.0, "loop_s": 28.0, "loop_cpu_s": 48.0},
        {"stage": "qc", "threads": 1, "workflow_job_s": 12.0, "loop_s": math.nan, "loop_cpu_s": math.nan},
        {"stage": "qc_metrics", "threads": 1, "workflow_job_s": 14.0, "loop_s": None, "loop_cpu_s": None},
    ]
    return {"scans": 5, "cores": cores, "loop_wall_s": loop_wall_s, "workflow_wall_s": 100.0, "stages": stages}


def test_the_floor_spreads_the_loops_cpu_seconds_over_the_cores_and_skips_stages_it_does_not_run():
    floor = bench.loop_cpu_floor(run_figures(loop_wall_s=50.0, cores=2))
    assert floor == {"loop_cpu_s": 70.0, "floor_wall_s": 35.0, "floor_ratio": 0.7}


def test_a_loop_that_leaves_its_core_idle_half_the_time_has_a_floor_of_half_its_wall():
    busy = bench.loop_cpu_floor(run_figures(loop_wall_s=70.0, cores=1))
    waiting = bench.loop_cpu_floor(run_figures(loop_wall_s=140.0, cores=1))
    assert busy["floor_ratio"] == 1.0
    assert waiting["floor_ratio"] == 0.5
