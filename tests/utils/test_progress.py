"""Console progress bar: hidden off a terminal, and log lines printed above it, never glued to
its end."""
import contextlib
import logging
import re
import sys

from segkit.utils.progress import ProgressBar


@contextlib.contextmanager
def segkit_console():
    """A console handler on the "segkit" logger writing to the current (captured) stderr, as
    ``setup_logging`` installs outside Hydra; removed afterwards. Made inside the test body:
    pytest swaps ``sys.stderr`` between the set-up and call phases."""
    log = logging.getLogger("segkit")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("LOG %(message)s"))
    old_level = log.level
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        yield log, handler
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)


def test_log_lines_go_above_the_bar_and_handlers_are_restored(capsys):
    with segkit_console() as (log, handler):
        before = list(log.handlers)
        with ProgressBar(4, enabled=True, mininterval=0, desc="work") as bar:
            bar.update_to(1)
            logging.getLogger("segkit.test").info("halfway there")
            bar.update_to(3, loss="0.5")
            assert handler not in log.handlers  # routed through tqdm.write while bar is open
        assert log.handlers == before
    err = capsys.readouterr().err
    assert err.count("LOG halfway there") == 1  # once: not also through another handler
    # the line starts a fresh line (the bar was cleared first) ...
    assert re.search(r"(^|[\r\n])LOG halfway there\n", err), repr(err)
    # ... and the bar is drawn again below it
    assert "3/4" in err.split("LOG halfway there")[1] and "loss=0.5" in err


def test_hidden_when_stderr_is_not_a_terminal(capsys):
    with segkit_console() as (log, handler):
        bar = ProgressBar(3, desc="work")  # enabled=None: decided by stderr, captured here
        for _ in bar.wrap(range(3)):
            logging.getLogger("segkit.test").info("step")
        bar.close()
        assert bar.n == 0 and handler in log.handlers
    assert capsys.readouterr().err == "LOG step\n" * 3  # only the log lines, no bar


def test_wrap_counts_items_and_resumes_part_way(capsys):
    bar = ProgressBar(10, initial=4, enabled=True, mininterval=0)
    assert list(bar.wrap("abc")) == ["a", "b", "c"]
    assert bar.n == 7
    bar.close()
    bar.close()  # idempotent
    assert "7/10" in capsys.readouterr().err
