"""``python -m bench`` / ``stepwise bench``: build, export and time a full-size random-weight model.

SD 1.5 is built and timed in full. SDXL, SD 3 Medium and FLUX.1-schnell do not fit beside another engine in
fp32 on a 24 GB machine: their ``configs/<family>.json`` name a repeated unit (``reduced``), the model is
built full width at two reduced depths, each timed, and the step extrapolated linearly to the real depth
(``run.combine_depths``): those rows are estimates, and the two measured runs are kept in the JSON."""

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
@click.option("--width", type=int, default=None, help="[the family's native size: SD 1.5 512, others 1024; tiny 64]")
@click.option("--height", type=int, default=None, help="[as --width]")
@click.option(
    "--steps", type=int, default=None, help="schedule length; the table's total column [the model's default steps]"
)
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
    default=30_000,
    show_default=True,
    help="load another engine beside the reference only while this much memory is left. Engines grow after "
    "loading (the graph cache maps weights lazily): at 15000 and 18000 five SD 1.5 engines loaded together "
    "ran a 24 GB machine out of memory, so the default times one engine at a time beside the reference "
    "unless the machine has well over 30 GB",
)
@click.option(
    "--phases",
    is_flag=True,
    help="instead: peak memory and time of `stepwise generate`, resident vs phased (bench/phases.py; --steps 2 "
    "unless given)",
)
def bench_cmd(
    model, width, height, steps, threads, repeats, engines, json_path, chart_path, no_peak, min_free_mb, phases
):
    """Time our engine against PyTorch and OpenVINO on a full-size random-weight model, interleaved."""
    if phases:
        from . import phases as phases_bench
        from .random_model import parse

        size = _default_size(*parse(model))
        phases_bench.run(model, None, width or size, height or size, steps or 2, None, 0, threads, None, json_path)
        return
    from . import chart, report, run
    from .export import exported_folder
    from .random_model import cache_name, cache_root, parse, reduced, source_folder

    kind, family = parse(model)
    entry = _registry_entry(kind, family)
    size = _default_size(kind, family)
    width, height = width or size, height or size
    if width % 8 or height % 8:
        raise click.BadParameter("width and height must be multiples of 8")
    threads = threads or _default_threads()
    steps = steps or entry.default_steps
    say = lambda m: click.echo(m, err=True)  # noqa: E731
    plan = reduced(family) if kind == "random" else None
    builds = [model] if plan is None else [f"random:{family}@u{u}" for u in plan["units"]]
    folders = [exported_folder(m, say) for m in builds]  # every build exported before anything is timed
    points = []
    for i, (build, folder) in enumerate(zip(builds, folders, strict=True)):
        if plan:
            say(f"=== {build}: depth {plan['units'][i]} of {plan['denoiser']['real']} units ===")
        points.append(
            run.run(
                model=build,
                folder=folder,
                source=source_folder(build, say),
                work=cache_root() / f"{cache_name(build)}-graphs",
                width=width,
                height=height,
                steps=steps,
                threads=threads,
                repeats=repeats,
                engines=[e.strip() for e in engines.split(",") if e.strip()],
                measure_peak=not no_peak and i == 0,
                min_free_mb=min_free_mb,
                guidance=entry.guidance,
                decode=i == 0,  # the reduced builds share the full-size VAE: decoded once
                progress=say,
            )
        )
        if plan and json_path:  # each measured build as soon as it is done
            report.write_json(points[-1], Path(json_path).with_suffix(f".u{plan['units'][i]}.json"))
    data = points[0] if plan is None else run.combine_depths(model, plan, points)
    for point in points if plan else ():
        click.echo(report.tables(point))
        click.echo("")
    click.echo(report.tables(data))
    if json_path:
        report.write_json(data, json_path)
        click.echo(f"wrote {json_path}", err=True)
    if chart_path:
        chart.draw(data, chart_path)
        click.echo(f"wrote {chart_path}", err=True)


def _registry_entry(kind: str, family: str):
    import registry

    from .random_model import config, split_units

    if kind == "tiny":
        from exporters.families import TINY_SOURCES

        if family not in TINY_SOURCES:
            raise click.BadParameter(f"no tiny:{family}; known: {', '.join(TINY_SOURCES)}")
        return registry.get(TINY_SOURCES[family][1])
    return registry.get(config(split_units(family)[0])["registry_model"])


def _default_size(kind: str, family: str) -> int:
    from .random_model import config, split_units

    return 64 if kind == "tiny" else int(config(split_units(family)[0]).get("default_size", 512))


def main() -> None:
    bench_cmd(prog_name="python -m bench")
