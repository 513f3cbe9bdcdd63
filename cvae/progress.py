"""The one progress display: a rich progress bar with a label, a count, free-form statistics,
the elapsed time and an ETA. The CVAE trainer, the prior's trainer and `cvae eval` all show
their progress through it; rich is imported only when a bar is made.
"""


class Bar:
    """A progress bar on stdout (or stderr) with tasks. ``transient`` bars vanish when done."""

    def __init__(self, stderr=False, transient=False, bar_width=24, console=None):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self.console = console or Console(stderr=stderr, highlight=False)
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(bar_width=bar_width),
            MofNCompleteColumn(), TextColumn("{task.fields[stats]}"), TimeElapsedColumn(),
            TextColumn("ETA"), TimeRemainingColumn(), console=self.console,
            transient=transient, refresh_per_second=4)
        self._started = False

    def start(self):
        if not self._started:
            self._progress.start()
            self._started = True
        return self

    def stop(self):
        if self._started:
            self._progress.stop()
            self._started = False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def add(self, label, total, completed=0):
        """A new task (line) of the bar; returns its id."""
        return self._progress.add_task(label, total=total, completed=completed, stats="")

    def update(self, task, completed=None, advance=None, stats=None):
        fields = {} if stats is None else {"stats": stats}
        self._progress.update(task, completed=completed, advance=advance, **fields)

    def remove(self, task):
        self._progress.remove_task(task)

    def print(self, text, markup=True):
        """A line above the bar (the bar stays at the bottom)."""
        self.console.print(text, markup=markup, soft_wrap=True)


def counter(total, label, stderr=True):
    """(Bar, advance(n)): a transient bar of one task that `advance` moves on."""
    bar = Bar(stderr=stderr, transient=True, bar_width=30)
    task = bar.add(label, total)
    return bar, lambda n: bar.update(task, advance=n)
