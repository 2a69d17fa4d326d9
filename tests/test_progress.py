import logging

from agentlm_jax.progress import Progress, format_duration


def test_off_a_terminal_progress_is_plain_log_lines_with_eta(caplog):
    caplog.set_level(logging.INFO, logger="agentlm_jax.progress")
    with Progress(total=10, desc="train", unit="step", initial=2, every_s=0.0, terminal=False) as bar:
        assert not bar.is_bar
        for _ in range(8):
            bar.update(1)
            bar.set_postfix(loss="1.23")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 9  # every update (every_s=0) and the closing line
    assert all("\r" not in line and "\x1b" not in line for line in lines)
    assert lines[0].startswith("train: 3/10 step (30%)") and "ETA" in lines[0]
    assert lines[-1].startswith("train: 10/10 step (100%)") and "took" in lines[-1] and "loss=1.23" in lines[-1]


def test_off_a_terminal_lines_are_spaced_by_the_interval(caplog):
    caplog.set_level(logging.INFO, logger="agentlm_jax.progress")
    with Progress(total=1000, desc="export", every_s=3600.0, terminal=False) as bar:
        for _ in range(1000):
            bar.update(1)
    assert [r.getMessage().split(",")[0] for r in caplog.records] == ["export: 1000/1000 it (100%)"]


def test_disabled_progress_prints_nothing(caplog, capsys):
    caplog.set_level(logging.INFO)
    with Progress(total=5, desc="x", enabled=False, every_s=0.0, terminal=True) as bar:
        assert not bar.is_bar
        bar.update(5)
    assert not caplog.records and capsys.readouterr().err == ""


def test_on_a_terminal_progress_is_a_tqdm_bar(capsys):
    with Progress(total=3, desc="bar", terminal=True) as bar:
        assert bar.is_bar
        bar.update(3)
    assert "bar: 100%" in capsys.readouterr().err


def test_durations_read_like_a_clock():
    assert [format_duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m05s"]
