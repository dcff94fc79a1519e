"""Running a batch with live progress bars: shared by `kiban run` and `kiban demo`."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from kiban.text import printable
from kiban_cli.common import console


def run_with_progress(**kwargs: object) -> dict:
    """Run a batch, drawing one bar per stage and model from the stores' progress.

    Model names are data: shown escaped and never read as markup. The live bars are
    transient and printed once more at the end, so a run that fails before any progress
    leaves only its one error line."""
    from kiban.pipeline import run_batch
    from kiban.status import BatchStatus

    with Progress(
        TextColumn("{task.description:<28}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        bars: dict[str, TaskID] = {}

        def show(name: str, done: int, total: int) -> None:
            if name not in bars:
                bars[name] = bar.add_task(name, total=total)
            bar.update(bars[name], completed=done, total=total)

        def tick(status: BatchStatus) -> None:
            show("ingest", int(status.ingested), 1)
            for m in status.models:
                name = printable(m.model)
                show(f"encode {name} (chunks)", m.encoded, m.chunks)
                show(f"index  {name} (chunks)", m.indexed, m.chunks)

        report = run_batch(progress=tick, **kwargs)  # type: ignore[arg-type]
    if bar.tasks:
        console.print(bar.make_tasks_table(bar.tasks))
    return report
