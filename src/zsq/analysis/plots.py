"""`zsq analyze`: PNG plots of finished runs: training curves overlaid, teacher vs Q-model attention maps on the
run's synthetic images, and a grid of those images per data source."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..distill import FeatureTap, channel_attention, find_stages, spatial_attention  # noqa: E402
from ..io import save_bytes  # noqa: E402
from ..models import load_model, read_checkpoint  # noqa: E402
from ..bench.report import read_runs  # noqa: E402

CURVES = ("loss_q", "grad_norm", "hessian_trace")
DPI = 100


def _label(run: dict[str, Any]) -> str:
    c = run["config"]
    return f"{c['source']} / {c.get('loss', 'ptq')} W{c['wbits']}A{c['abits']} s{c['seed']}"


def _metrics(run_dir: str) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _smooth(values: list[float], width: int) -> list[float]:
    """Running mean over `width` points: per-iteration losses are too noisy to compare by eye."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - width] if i >= width else 0.0)
        out.append(acc / min(i + 1, width))
    return out


def plot_curves(runs: list[dict[str, Any]], out_dir: Path, smooth: int = 20) -> Path:
    """One panel per quantity (the Q loss, its gradient norm, the Hessian trace, then every loss term any run
    logged), each run a line; trained iterations only."""
    rows = {r["dir"]: [m for m in _metrics(r["dir"]) if m.get("warmup") is False] for r in runs}
    terms = sorted({k for ms in rows.values() for m in ms for k, v in m.items()
                    if isinstance(v, float) and k not in ("lr_q", "wall_s", *CURVES) and not k.endswith("_se")})
    keys = [k for k in CURVES if any(k in m for ms in rows.values() for m in ms)] + terms
    cols = min(3, len(keys))
    fig, axes = plt.subplots(math.ceil(len(keys) / cols), cols, figsize=(5 * cols, 3.4 * math.ceil(len(keys) / cols)),
                             squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for i, run in enumerate(runs):  # one colour per run in every panel
            pts = [(m["iter"], m[key]) for m in rows[run["dir"]] if key in m and math.isfinite(m[key])]
            if pts:
                its, vals = zip(*pts, strict=True)
                ys = list(vals) if key == "hessian_trace" else _smooth(list(vals), smooth)
                ax.plot(its, ys, color=f"C{i % 10}", marker="o" if key == "hessian_trace" else None,
                        label=_label(run))
        ax.set_title(key)
        ax.set_xlabel("iteration")
        if key in ("grad_norm", "hessian_trace", "loss_q"):  # a Hutchinson estimate may come out ≤ 0
            positive = all(v > 0 for line in ax.get_lines() for v in line.get_ydata())
            ax.set_yscale("log" if positive else "symlog")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out_dir / "curves.png")


def _samples(run_dir: str) -> dict[str, Any] | None:
    path = Path(run_dir) / "samples.pt"
    return read_checkpoint(path) if path.exists() else None


def _show(ax, img: torch.Tensor) -> None:
    img = img.float()
    img = (img - img.min()) / (img.max() - img.min() + 1e-8)
    ax.imshow(img[0] if img.shape[0] == 1 else img.permute(1, 2, 0), cmap="gray" if img.shape[0] == 1 else None)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_samples(runs: list[dict[str, Any]], out_dir: Path, n: int = 16) -> list[Path]:
    """A grid of the synthetic images of each data source (the first run of each that saved samples)."""
    paths, seen = [], set()
    for run in runs:
        source, data = run["config"]["source"], _samples(run["dir"])
        if source in seen or data is None:
            continue
        seen.add(source)
        k = min(n, len(data["images"]))
        cols = min(8, k)
        fig, axes = plt.subplots(math.ceil(k / cols), cols, figsize=(1.4 * cols, 1.5 * math.ceil(k / cols)),
                                 squeeze=False)
        for ax, img, y in zip(axes.flat, data["images"][:k], data["labels"][:k], strict=False):
            _show(ax, img)
            ax.set_title(str(int(y)), fontsize=8)
        for ax in list(axes.flat)[k:]:
            ax.axis("off")
        fig.suptitle(f"{source} synthetic images (labels above)")
        fig.tight_layout()
        paths.append(_save(fig, out_dir / f"samples_{source}.png"))
    return paths


@torch.no_grad()
def plot_attention(run: dict[str, Any], out_dir: Path, n: int = 4) -> Path | None:
    """Teacher vs Q-model spatial attention at each stage on `n` of the run's synthetic images, and their channel
    attention at each stage (mean over the images)."""
    data = _samples(run["dir"])
    if data is None:
        return None
    cfg = run["config"]
    teacher = load_model(cfg["teacher"], checkpoint=cfg.get("checkpoint")).eval()
    student = load_model(Path(run["dir"]) / "student.pt").eval()
    x = data["images"][:n]
    stages = find_stages(teacher, x)
    maps = []
    for model in (teacher, student):
        tap = FeatureTap(model, stages)
        model(x)
        maps.append(tap.take())
        tap.remove()
    fig, axes = plt.subplots(len(x) + 1, 1 + 2 * len(stages), figsize=(1.6 * (1 + 2 * len(stages)), 1.7 * (len(x) + 1)),
                             squeeze=False)
    for i in range(len(x)):
        _show(axes[i, 0], x[i])
        for j, name in enumerate(stages):
            for k, who in enumerate(("T", "Q")):
                f = maps[k][name][i: i + 1]
                ax = axes[i, 1 + 2 * j + k]
                ax.imshow(spatial_attention(f).view(f.shape[2:]).numpy(), cmap="viridis")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"{who} {name}", fontsize=7)
    axes[-1, 0].axis("off")
    for j, name in enumerate(stages):
        ax = axes[-1, 1 + 2 * j]
        for k, who in enumerate(("teacher", "Q")):
            ax.plot(channel_attention(maps[k][name]).mean(0).numpy(), label=who, lw=0.8)
        ax.set_title(f"channel att. {name}", fontsize=7)
        ax.tick_params(labelsize=5)
        axes[-1, 2 + 2 * j].axis("off")
    axes[-1, 1].legend(fontsize=5)
    fig.suptitle(f"spatial attention, teacher (T) vs Q model: {_label(run)}", fontsize=9)
    fig.tight_layout()
    name = Path(run["dir"]).name
    return _save(fig, out_dir / f"attention_{name}.png")


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    plt.close(fig)
    return save_bytes(buf.getvalue(), path)


def analyze(paths: list[str | Path], out_dir: str | Path, attention_runs: int = 4) -> list[Path]:
    """Every plot for the finished runs under `paths`; attention maps for the first `attention_runs` runs."""
    runs = read_runs(paths)
    out = Path(out_dir)
    written = [plot_curves(runs, out), *plot_samples(runs, out)]
    for run in runs[:attention_runs]:
        path = plot_attention(run, out)
        if path is not None:
            written.append(path)
    if len(written) == 1 and not any(_samples(r["dir"]) for r in runs):
        print("zsq analyze: these runs saved no samples.pt (older zsq): curves only", flush=True)
    return written

