"""results.md and the plots, from a hand-written report (no model)."""

from __future__ import annotations

import math

from continual_transformer.tasks.bench.report import render_markdown, write_plots, write_report_files


def hand_report() -> dict:
    method = {
        "avg_accuracy": 0.75,
        "bwt": -0.25,
        "fwt": 0.1,
        "forgetting": 0.25,
        "routed_avg_accuracy": 0.5,
        "router_accuracy": 1.0,
        "params_after_first_task": 1500,
        "params_after_last_task": 2_500_000,
        "state_bytes_after_first_task": 10,
        "state_bytes_after_last_task": 3_000_000_000,
        "state_bytes_over_tasks": [10, 3_000_000_000],
        "train_s_per_task": 2.0,
        "train_time_vs_plain_adapter": None,
        "accuracy_matrix": [[1.0, math.nan], [0.5, 1.0]],
    }
    return {
        "meta": {
            "model": "tiny",
            "device": "cpu (float32)",
            "version": "0",
            "date": "today",
            "tasks": ["a", "b"],
            "train_examples": [3, 4],
            "test_examples": [1, 2],
            "settings": {"quick": True},
            "zero_shot_accuracy": [0.5, 0.25],
            "wall_s": 12.0,
            "unfinished": ["joint"],
        },
        "suite": "clinc150-10",
        "methods": {"sequential": method, "ewc": {**method, "accuracy_matrix": [[1.0, None], [0.5, 1.0]]}},
    }


def test_markdown_shows_every_method_sizes_and_unevaluated_cells_as_dashes():
    text = render_markdown(hand_report())
    assert text.startswith("# Task-incremental benchmark: clinc150-10")
    assert "2 tasks, 7 training / 3 test examples (quick profile); 12 s in all." in text
    assert "Not finished in this run (no row): joint." in text
    assert "zero-shot accuracy 0.375" in text  # mean of b[k]
    row = (
        "| sequential | 0.750 | -0.250 | 0.100 | 0.250 | 0.500 | 1.000 | "
        "1.50k → 2.50M | 10 → 3.00G | 2.0 | - |"
    )
    assert row in text
    assert "| a | 1.00 | - |" in text and "| b | 0.50 | 1.00 |" in text  # NaN and JSON null alike
    assert "### ewc" in text


def test_report_files_are_written(tmp_path):
    paths = write_plots(hand_report(), tmp_path)
    assert [p.name for p in paths] == ["accuracy_matrix.png", "accuracy_vs_tasks.png", "state_vs_tasks.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    (tmp_path / "out").mkdir()
    write_report_files(hand_report(), tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "results.json",
        "results.md",
        "accuracy_matrix.png",
        "accuracy_vs_tasks.png",
        "state_vs_tasks.png",
    }
