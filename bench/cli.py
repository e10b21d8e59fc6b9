"""``python -m bench`` / ``stepwise bench``: build, export and time a full-size random-weight model."""

from __future__ import annotations

from pathlib import Path

import click

from . import variants

DEFAULT_ENGINES = ",".join(variants.COMPARISON + variants.TUNED + variants.FAST_MODES)


def _default_threads() -> int:
    from engine.session import physical_cores

    return physical_cores()


@click.command("bench")
@click.option(
    "--model", default="sd15", show_default=True, help="random:<family> (sd15 = random:sd15) or tiny:<family>"
)
@click.option("--width", type=int, default=512, show_default=True)
@click.option("--height", type=int, default=512, show_default=True)
@click.option("--steps", type=int, default=20, show_default=True, help="schedule length; the table's total column")
@click.option("--threads", type=int, default=None, help="intra-op threads for every engine [physical cores]")
@click.option("--repeats", type=int, default=3, show_default=True, help="timed rounds after one warm-up")
@click.option(
    "--engines",
    default=DEFAULT_ENGINES,
    show_default=True,
    help=f"comma-separated; any of {', '.join(variants.names())}",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="write the results here")
@click.option("--chart", "chart_path", type=click.Path(dir_okay=False, path_type=Path), help="PNG: time against steps")
@click.option("--no-peak", is_flag=True, help="skip the matmul peak measurement")
@click.option(
    "--min-free-mb",
    type=float,
    default=15_000,
    show_default=True,
    help="load another engine beside the reference only while this much memory is left",
)
def bench_cmd(model, width, height, steps, threads, repeats, engines, json_path, chart_path, no_peak, min_free_mb):
    """Time our engine against PyTorch and OpenVINO on a full-size random-weight model, interleaved."""
    from . import chart, report, run
    from .export import exported_folder
    from .random_model import cache_name, cache_root, source_folder

    if width % 8 or height % 8:
        raise click.BadParameter("width and height must be multiples of 8")
    threads = threads or _default_threads()
    folder = exported_folder(model)
    data = run.run(
        model=model,
        folder=folder,
        source=source_folder(model),
        work=cache_root() / f"{cache_name(model)}-graphs",
        width=width,
        height=height,
        steps=steps,
        threads=threads,
        repeats=repeats,
        engines=[e.strip() for e in engines.split(",") if e.strip()],
        measure_peak=not no_peak,
        min_free_mb=min_free_mb,
        progress=lambda m: click.echo(m, err=True),
    )
    click.echo(report.tables(data))
    if json_path:
        report.write_json(data, json_path)
        click.echo(f"wrote {json_path}", err=True)
    if chart_path:
        chart.draw(data, chart_path)
        click.echo(f"wrote {chart_path}", err=True)


def main() -> None:
    bench_cmd(prog_name="python -m bench")
