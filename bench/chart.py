"""The guide's "Time on CPU" chart for this machine: total seconds against steps, one line per engine.

matplotlib (the ``bench`` extra) draws it; without matplotlib a plainer chart is drawn with Pillow, which
the runtime already depends on, so ``--chart`` always works.
"""

from __future__ import annotations

from pathlib import Path

from .report import normalized, total_seconds

MAX_STEPS = 50
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]


def _series(data: dict) -> dict[str, list[float]]:
    steps = range(1, MAX_STEPS + 1)
    return {name: [total_seconds(data, name, n) or 0.0 for n in steps] for name in data["results"]}


def _title(data: dict) -> str:
    cpu = data.get("machine", {}).get("cpu", "CPU")
    guidance = "guidance on" if data.get("guidance", 1) is not None else "no guidance"
    est = ", estimated from reduced depth" if "estimate" in data else ""
    return f"{data['model']} {data['width']}x{data['height']}, {guidance}, {data['threads']} threads, {cpu}{est}"


def _label(data: dict, name: str) -> str:
    step_s, vae_s = normalized(data, name)
    return f"{name} ({step_s:.2f} s/step, VAE {vae_s or 0:.1f} s)"


def _draw_matplotlib(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    steps = list(range(1, MAX_STEPS + 1))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for i, (name, totals) in enumerate(_series(data).items()):
        label = _label(data, name)
        width = 2.4 if name == "stepwise" else 1.4
        ax.plot(steps, totals, color=COLORS[i % len(COLORS)], linewidth=width, label=label)
    ax.set_xlabel("denoising steps")
    ax.set_ylabel("seconds: text encoding + steps x step + VAE decode")
    ax.set_title(_title(data), fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.set_xlim(1, MAX_STEPS)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _draw_pillow(data: dict, path: Path) -> None:
    from PIL import Image, ImageDraw

    width, height, left, right, top, bottom = 880, 550, 70, 20, 40, 150
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    series = _series(data)
    y_max = max(max(v) for v in series.values()) * 1.05 or 1.0
    plot_w, plot_h = width - left - right, height - top - bottom

    def point(step: int, seconds: float) -> tuple[float, float]:
        return left + (step - 1) / (MAX_STEPS - 1) * plot_w, top + plot_h * (1 - seconds / y_max)

    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    for k in range(6):
        seconds = y_max * k / 5
        _, y = point(1, seconds)
        draw.line([left, y, left + plot_w, y], fill="#dddddd")
        draw.text((5, y - 6), f"{seconds:.3g} s", fill="black")
    for step in (1, 10, 20, 30, 40, 50):
        x, _ = point(step, 0)
        draw.text((x - 6, top + plot_h + 5), str(step), fill="black")
    draw.text((left + plot_w // 2 - 50, top + plot_h + 22), "denoising steps", fill="black")
    draw.text((left, 12), _title(data), fill="black")
    for i, (name, totals) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        draw.line([point(n + 1, s) for n, s in enumerate(totals)], fill=color, width=3 if name == "stepwise" else 2)
        y = top + plot_h + 45 + 16 * i
        draw.line([left, y + 6, left + 30, y + 6], fill=color, width=3)
        draw.text((left + 38, y), _label(data, name), fill="black")
    image.save(path)


def draw(data: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        _draw_pillow(data, path)
    else:
        _draw_matplotlib(data, path)
    return path


def main() -> None:
    """``python -m bench.chart RUN.json OUT.png [--drop ENGINE …]``: redraw a run's chart from its JSON."""
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m bench.chart", description=main.__doc__)
    parser.add_argument("run_json", type=Path)
    parser.add_argument("out_png", type=Path)
    parser.add_argument("--drop", action="append", default=[], help="leave this engine out (repeatable)")
    args = parser.parse_args()
    data = json.loads(args.run_json.read_text())
    for name in args.drop:
        data["results"].pop(name, None)
    draw(data, args.out_png)


if __name__ == "__main__":
    main()
