"""The run directory: atomic writes, claiming a model_dir, metrics (no training here)."""

import json

import pytest

from keras_bn.train.rundir.folder import RunConflictError, RunDir, atomic_write_text


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_text(tmp_path / "a.json", "1")
    atomic_write_text(tmp_path / "a.json", "2")
    assert (tmp_path / "a.json").read_text() == "2"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_run_dir_refuses_a_different_run_and_foreign_files(tmp_path):
    run = RunDir(tmp_path / "run")
    with run.claim({"lr": 0.5}, json.dumps({"lr": 0.5})):
        run.commit()
    assert run.check({"lr": 0.5}) == {"lr": 0.5}
    with pytest.raises(RunConflictError, match="lr: 0.5 != 0.1"):
        RunDir(tmp_path / "run").check({"lr": 0.1})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(RunConflictError, match="not empty"):
        RunDir(tmp_path / "other").check({"lr": 0.5})


def test_failed_start_removes_what_it_created_but_never_an_existing_run(tmp_path):
    run = RunDir(tmp_path / "new" / "deep" / "run")
    with pytest.raises(RuntimeError), run.claim({"a": 1}, "{}"):
        (run.path / "checkpoints").mkdir()
        raise RuntimeError("model build failed")
    assert not (tmp_path / "new").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError), RunDir(empty).claim({"a": 1}, "{}"):
        raise RuntimeError
    assert empty.exists() and not any(empty.iterdir())

    kept = RunDir(tmp_path / "kept")
    with kept.claim({"a": 1}, '{"a": 1}'):
        kept.commit()
    with pytest.raises(RuntimeError), RunDir(kept.path).claim({"a": 1}, '{"a": 1}'):
        raise RuntimeError  # a resumed run that fails keeps its directory
    assert kept.config_path.exists()


def test_metrics_are_truncated_to_the_restored_step_and_torn_lines_dropped(tmp_path):
    run = RunDir(tmp_path)
    for step in (10, 20, 30):
        run.append_metrics({"step": step})
    with open(run.metrics_path, "a") as f:
        f.write('{"step": 4')  # a line torn by a kill
    again = RunDir(tmp_path)
    assert [r["step"] for r in again.metrics()] == [10, 20, 30]
    again.truncate_metrics(20)
    assert [json.loads(line)["step"] for line in run.metrics_path.read_text().splitlines()] == [
        10,
        20,
    ]
