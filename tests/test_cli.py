"""The `isoflop` command's contract for errors: a user's mistake is one line and exit code 2; a bug keeps its traceback."""
import pytest

import pipeline.cli as cli
from conftest import cli as isoflop_here
from pipeline.errors import DataError, IsoflopError, RunsError


def test_user_errors_are_one_line_and_exit_2(monkeypatch, capsys):
    def bad_input(args):
        raise DataError("data: /nowhere: no such folder")

    monkeypatch.setattr(cli, "cmd_models", bad_input)
    assert cli.main(["models"]) == 2
    assert capsys.readouterr().err == "isoflop models: error: data: /nowhere: no such folder\n"


def test_a_bug_is_not_disguised_as_a_user_error(monkeypatch):
    def bug(args):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(cli, "cmd_models", bug)
    with pytest.raises(ValueError, match="internal invariant"):
        cli.main(["models"])


def test_every_user_facing_error_is_one_family():
    import pipeline.errors as errors

    families = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, Exception)]
    assert len(families) >= 9 and all(issubclass(e, IsoflopError) for e in families)
    assert issubclass(RunsError, ValueError)  # pydantic validators report these as field errors


def test_an_unknown_shape_names_the_value_and_a_near_miss(capsys):
    assert cli.main(["train", "--family", "mdm", "--model", "cpu-26K", "--flops", "1e12", "--data", "/x", "--out", "/y"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown shape 'cpu-26K'" in err and "did you mean 'cpu-26k'" in err


def test_default_store_is_mlflows_and_an_earlier_default_store_stays_found(tmp_path, monkeypatch, capsys):
    from pipeline.mlflow_keys import DEFAULT_TRACKING_URI, resolve_uri

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    assert resolve_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "mlruns.db").write_bytes(b"")  # runs tracked before the default changed
    assert resolve_uri() == f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert "earlier isoflop versions" in capsys.readouterr().err
    assert resolve_uri() == f"sqlite:///{tmp_path / 'mlruns.db'}" and not capsys.readouterr().err  # said once
    (tmp_path / "mlflow.db").write_bytes(b"")  # once MLflow's default exists, it wins
    assert resolve_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert resolve_uri("sqlite:///other.db") == f"sqlite:///{tmp_path / 'other.db'}"


@pytest.mark.parametrize("command", [
    ["analyze", "--experiment", "x"],
    ["runs", "--experiment", "x", "--out", "runs.csv"],
    ["sample", "--run", "abc", "--prompt", "1"],
    ["export", "--run", "abc", "--out", "exported"],
    ["eval", "--run", "abc", "--tasks", "synthetic_choice"],
])
def test_an_unreachable_tracking_server_fails_in_seconds_naming_it(tmp_path, monkeypatch, capsys, command):
    """A refused connection is one line and exit 2 in seconds; the MLflow client alone retries it for minutes."""
    import time

    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    code, _, err = isoflop_here(capsys, *command, "--tracking-uri", "http://127.0.0.1:1")
    assert code == 2 and time.monotonic() - start < 15
    assert err.strip() == f"isoflop {command[0]}: error: tracking_uri: cannot reach http://127.0.0.1:1: " \
                          "[Errno 111] Connection refused", err
    assert list(tmp_path.iterdir()) == []  # nothing written
