"""Every command ends in one boundary: a fixable failure is one line on stderr and its exit code."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cli import main
from services.common.errors import EXIT_NO_DATA, EXIT_USAGE


@pytest.fixture(autouse=True)
def _logging_left_as_found() -> Iterator[None]:
    # A command configures logging onto the captured stderr, which closes after the test.
    import logging

    import structlog

    import services.common.logging as fedmq_logging

    handlers = list(logging.getLogger().handlers)
    yield
    structlog.reset_defaults()
    fedmq_logging._configured = False
    for handler in logging.getLogger().handlers:
        if handler not in handlers:
            logging.getLogger().removeHandler(handler)


def _fail(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse's own usage errors
        code = int(exit_.code or 0)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return code, lines[0]


def test_a_misspelt_task_file_field_is_named_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a task file whose strategy misspells buffer_size on line 7
    task = tmp_path / "task.yaml"
    task.write_text(
        "spec:\n  task_id: t1\n  model: cnn-small\n  num_classes: 2\n"
        "strategy:\n  name: fedbuff\n  bufer_size: 3\n"
    )
    # When the aggregator starts from it
    code, line = _fail(capsys, "aggregator", "--task-file", str(task))
    # Then one line names the file, the line and the field, with the usage exit code
    assert code == EXIT_USAGE
    assert f"{task}:7:" in line and "strategy.bufer_size" in line and "spelling" in line


def test_broken_yaml_in_a_task_file_is_reported_with_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = tmp_path / "task.yaml"
    task.write_text("spec:\n  task_id: t1\n  model: [cnn-small\n")
    code, line = _fail(capsys, "aggregator", "--task-file", str(task))
    assert code == EXIT_USAGE
    assert line.startswith("fedmq aggregator: error: ") and "not valid YAML" in line
    assert f"{task}:4:" in line


def test_an_out_of_range_task_value_names_the_field_and_the_value(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    task = tmp_path / "task.json"
    task.write_text('{"spec": {"task_id": "t1", "model": "cnn-small", "num_classes": 1}}')
    code, line = _fail(capsys, "aggregator", "--task-file", str(task))
    assert code == EXIT_USAGE
    assert "spec.num_classes" in line and "(got 1)" in line


def test_a_missing_task_file_is_missing_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, line = _fail(capsys, "aggregator", "--task-file", str(tmp_path / "none.yaml"))
    assert code == EXIT_NO_DATA
    assert "none.yaml does not exist" in line and "--task-file" in line


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("aggregator", "--strategy", "fedprox"), "invalid choice: 'fedprox'"),
        (("aggregator", "--model", "resnet99"), "invalid choice: 'resnet99'"),
        (("demo", "--model", "resnet99"), "invalid choice: 'resnet99'"),
        (("trainer", "--trainer-id", "a", "--num-sites", "two"), "invalid int value: 'two'"),
        (("evaluator", "--split", "dev"), "invalid choice: 'dev'"),
    ],
)
def test_a_bad_flag_value_is_one_line_that_points_at_help(
    argv: tuple[str, ...], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, line = _fail(capsys, *argv)
    assert code == EXIT_USAGE
    assert expected in line and f"(see fedmq {argv[0]} --help)" in line


def test_a_trainer_without_an_id_is_told_the_flag_and_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("FEDMQ_TRAINER_ID", raising=False)
    code, line = _fail(capsys, "trainer")
    assert code == EXIT_USAGE
    assert "trainer_id (--trainer-id or FEDMQ_TRAINER_ID): Field required" in line


def test_a_setting_out_of_range_in_the_environment_is_named(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FEDMQ_HEARTBEAT", "-5")
    code, line = _fail(capsys, "trainer", "--trainer-id", "site-0")
    assert code == EXIT_USAGE
    assert "heartbeat (--heartbeat or FEDMQ_HEARTBEAT)" in line and "(got '-5')" in line


def test_a_missing_data_set_is_missing_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given an image folder that does not exist
    missing = tmp_path / "hospital-images"
    code, line = _fail(
        capsys, "centralized", "--data-source", f"folder:{missing}", "--run-dir", str(tmp_path)
    )
    # Then the command says which and where to point instead
    assert code == EXIT_NO_DATA
    assert f"image folder {missing} does not exist" in line and "--data-source" in line
