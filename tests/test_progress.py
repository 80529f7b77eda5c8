"""grok.progress: tqdm bars on a TTY (or in a notebook), one log line otherwise; thread-safe."""
from __future__ import annotations

import io
import logging
import threading

import pytest

from grok import progress
from grok.progress import Progress


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_disabled_draws_nothing_and_logs_the_summary(caplog):
    stream = Tty()
    with caplog.at_level(logging.INFO, logger="grok.test"):
        with Progress(4, "reading x", enabled=False, stream=stream,
                      logger=logging.getLogger("grok.test")) as bar:
            for _ in range(4):
                bar.update(1, 250_000_000)
    assert stream.getvalue() == ""
    assert not bar.draw
    [record] = caplog.records
    assert record.getMessage().startswith("reading x: 4/4 files, 1.00 GB in ")
    assert record.getMessage().endswith(" GB/s)")


def test_not_a_tty_draws_nothing_and_logs(caplog):
    stream = io.StringIO()      # isatty() is False
    with caplog.at_level(logging.INFO, logger="grok.progress"):
        with Progress(2, "writing", stream=stream) as bar:
            bar.update(2, 10)
    assert stream.getvalue() == "" and not bar.draw
    assert "writing: 2/2 files" in caplog.text


def test_tty_draws_a_tqdm_bar_and_logs_nothing(caplog):
    stream = Tty()
    with caplog.at_level(logging.INFO, logger="grok.progress"):
        with Progress(3, "demo", stream=stream, min_interval=0.0, unit="tensors") as bar:
            for _ in range(3):
                bar.update(1, 10**9)
    text = stream.getvalue()
    assert bar.draw
    assert "\r" in text and text.endswith("\n")
    assert "demo: 100%|" in text and "3/3 tensors" in text and "3.00 GB" in text and "GB/s" in text
    assert "#" in text          # a StringIO has no encoding: tqdm's ASCII bar
    assert caplog.text == ""


def test_an_error_inside_logs_no_summary_and_close_is_idempotent(caplog):
    with caplog.at_level(logging.INFO, logger="grok.progress"):
        with pytest.raises(RuntimeError):
            with Progress(5, "failing", stream=io.StringIO()) as bar:
                bar.update(1)
                raise RuntimeError("boom")
        bar.close()
    assert caplog.text == ""
    bar = Progress(1, "twice", stream=io.StringIO())
    with caplog.at_level(logging.INFO, logger="grok.progress"):
        bar.close()
        bar.close()
    assert caplog.text.count("twice: 0/1 files") == 1


@pytest.mark.parametrize("draw", [False, True], ids=["logged", "drawn"])
def test_counts_and_bytes_add_up_across_threads(draw):
    threads, each = 8, 200
    stream = Tty() if draw else io.StringIO()
    bar = Progress(threads * each, "threads", stream=stream, min_interval=0.0)

    def work(i):
        for _ in range(each):
            bar.update(1, i + 1)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    bar.close()
    assert bar.done == threads * each
    assert bar.nbytes == each * sum(range(1, threads + 1))
    if draw:
        assert bar._bar.n == threads * each
        assert f"{threads * each}/{threads * each} files" in stream.getvalue()


def test_draws_through_tqdm_auto_in_a_notebook(monkeypatch, capsys):
    """Inside a Jupyter kernel the default stream (not a TTY there) still gets a bar, from
    tqdm.auto's class (here, outside a kernel, tqdm.auto is the text bar on stderr)."""
    monkeypatch.setattr(progress, "in_notebook", lambda: True)
    with Progress(2, "nb") as bar:
        bar.update(2, 5 * 10**8)
    assert bar.draw
    assert "2/2 files" in capsys.readouterr().err


def test_not_a_notebook_here():
    assert progress.in_notebook() is False


def test_sizes_below_a_gigabyte_in_megabytes(caplog):
    with caplog.at_level(logging.INFO, logger="grok.progress"):
        with Progress(1, "small", stream=io.StringIO()) as bar:
            bar.update(1, 14_210_000)
    assert "small: 1/1 files, 14.21 MB in " in caplog.text
    assert progress._size(999e6) == "999.00 MB" and progress._size(2.5e9) == "2.50 GB"
