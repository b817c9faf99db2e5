"""`fedmq report` output: the Markdown table's numbers, the PNG, the figure, the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.lines import Line2D

from services.report import RunManifest, append_eval_report, load_run, summarize, write_manifest
from services.report.cli import register
from services.report.plots import report_figure
from services.report.tables import markdown_table
from services.report.writer import write_report
from tests.unit.test_report_summary import TARGETS, eval_report, write_federated_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_centralized_run(run_dir: Path) -> Path:
    write_manifest(
        run_dir,
        RunManifest(name="central", kind="centralized", model="cnn-small", started_at=500.0),
    )
    for version, (accuracy, seconds) in enumerate([(0.6, 2.0), (0.9, 30.0), (0.88, 61.0)]):
        append_eval_report(
            run_dir / "eval.jsonl",
            eval_report(
                version, accuracy, accuracy, 147 * version, 500.0 + seconds, 501.0 + seconds
            ),
        )
    return run_dir


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == PNG_SIGNATURE
    assert header[12:16] == b"IHDR"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


def test_markdown_table_row_holds_the_hand_computed_numbers_of_the_log(tmp_path: Path) -> None:
    # Given
    summary = summarize(load_run(write_federated_run(tmp_path / "fed")), TARGETS)
    # When
    lines = markdown_table([summary], TARGETS).splitlines()
    # Then
    assert lines[0] == (
        "| run | kind | model | evals | val-selected version | test acc (val-selected) "
        "| test AUC (val-selected) | final acc | final AUC | last 30 s mean acc "
        "| last 30 s min acc | last 30 s mean AUC | majority-class rate | time to 0.80 (s) "
        "| updates to 0.80 | time to 0.84 (s) | updates to 0.84 | time to 0.90 (s) "
        "| updates to 0.90 | best test acc (optimistic bound) "
        "| best test AUC (optimistic bound) | duration (s) |"
    )
    assert lines[2] == (
        "| fedbuff-4 | federated (fedbuff) | cnn-small | 5 | 4 | 0.8125 | 0.9375 | 0.8125 "
        "| 0.9375 | 0.8192 | 0.8000 | 0.9292 | n/a | 25.0 | 20 | 37.5 | 30 "
        "| not reached | not reached | 0.8450 | 0.9500 | 50.0 |"
    )
    assert len(lines) == 3


def test_report_writes_a_png_and_a_markdown_table_with_one_row_per_run(tmp_path: Path) -> None:
    # Given
    runs = [write_federated_run(tmp_path / "fed"), write_centralized_run(tmp_path / "central")]
    # When
    report = write_report(runs, tmp_path / "out", targets=(0.80, 0.85))
    # Then
    assert report.png_path == tmp_path / "out" / "report.png"
    assert png_size(report.png_path) == (1430, 990)
    assert report.png_path.stat().st_size > 30_000  # four panels of lines, not a blank canvas
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert (
        "| fedbuff-4 | federated (fedbuff) | cnn-small | 5 | 4 | 0.8125 | 0.9375 | 0.8125 "
        "| 0.9375 | 0.8192 | 0.8000 | 0.9292 | n/a | 25.0 | 20 | not reached "
        "| not reached | 0.8450 | 0.9500 | 50.0 |"
    ) in markdown
    assert (
        "| central | centralized | cnn-small | 3 | n/a | n/a | n/a | 0.8800 | 0.8800 | 0.8800 "
        "| 0.8800 | 0.8800 | n/a | 30.0 | 147 | 30.0 | 147 | 0.9000 | 0.9000 | 61.0 |"
    ) in markdown
    assert "![report](report.png)" in markdown


def test_figure_has_one_line_per_run_in_each_panel_and_dashed_targets_on_accuracy(
    tmp_path: Path,
) -> None:
    # Given
    runs = [
        load_run(write_federated_run(tmp_path / "fed")),
        load_run(write_centralized_run(tmp_path / "central")),
    ]
    # When
    axes = report_figure(runs, targets=(0.80, 0.85)).axes
    # Then
    assert [(ax.get_xlabel().split()[0], ax.get_ylabel()) for ax in axes] == [
        ("wall-clock", "test accuracy"), ("wall-clock", "test AUC"),
        ("updates", "test accuracy"), ("updates", "test AUC"),
    ]  # fmt: skip
    run_lines = [[line for line in ax.get_lines() if line.get_label() in ("fedbuff-4", "central")]
                 for ax in axes]  # fmt: skip
    assert [len(lines) for lines in run_lines] == [2, 2, 2, 2]
    assert np.asarray(run_lines[0][0].get_xdata()).tolist() == [0.0, 12.5, 25.0, 37.5, 50.0]
    assert np.asarray(run_lines[2][1].get_xdata()).tolist() == [0.0, 147.0, 294.0]
    assert np.asarray(run_lines[1][0].get_ydata()).tolist() == [0.6, 0.8, 0.9, 0.95, 0.9375]
    dashed = [_dashed_levels(ax.get_lines()) for ax in axes]
    assert dashed == [[0.80, 0.85], [], [0.80, 0.85], []]


def test_the_accuracy_panels_draw_the_majority_class_rate_as_a_dotted_line(
    tmp_path: Path,
) -> None:
    # Given a run whose test reports pin the class rates (0.375 / 0.625)
    run = load_run(write_federated_run(tmp_path / "fed"))
    run = dataclasses.replace(run, class_rates=(0.375, 0.625))
    # When the figure is drawn
    axes = report_figure([run]).axes
    # Then both accuracy panels carry a dotted line at 0.625, the AUC panels none
    dotted = [
        [
            float(np.asarray(line.get_ydata())[0])
            for line in ax.get_lines()
            if line.get_linestyle() == ":"
        ]
        for ax in axes
    ]
    assert dotted == [[0.625], [], [0.625], []]


def _dashed_levels(lines: list[Line2D]) -> list[float]:
    return [
        float(np.asarray(line.get_ydata())[0]) for line in lines if line.get_linestyle() == "--"
    ]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fedmq")
    subcommands: Any = parser.add_subparsers(dest="command", required=True)
    register(subcommands)
    return parser.parse_args(argv)


def test_report_command_prints_the_table_and_writes_both_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given
    args = _parse(["report", str(write_federated_run(tmp_path / "fed")), "--out",
                   str(tmp_path / "out"), "--targets", "0.8"])  # fmt: skip
    # When
    code = args.func(args)
    # Then
    out = capsys.readouterr().out
    assert code == 0
    assert "fedbuff-4" in out
    assert "25.0" in out
    assert (tmp_path / "out" / "report.png").is_file()
    assert (tmp_path / "out" / "report.md").is_file()


def test_report_command_on_an_empty_log_exits_2_with_the_reason_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given
    run_dir = tmp_path / "run"
    write_manifest(run_dir, RunManifest(name="r", kind="federated", model="m", started_at=0.0))
    (run_dir / "eval.jsonl").touch()
    args = _parse(["report", str(run_dir), "--out", str(tmp_path / "out")])
    # When
    code = args.func(args)
    # Then
    assert code == 2
    assert "holds no evaluation yet" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_report_command_rejects_a_target_outside_zero_to_one(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        _parse(["report", str(tmp_path), "--out", str(tmp_path), "--targets", "85"])
