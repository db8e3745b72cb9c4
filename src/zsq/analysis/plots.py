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
import matplotlib.patches  # noqa: E402
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
    logged), each run a line of its own colour in every panel and named once in the figure's legend; the warm-up
    iterations (generator only, ranges observing) are drawn too, on a grey band."""
    rows = {r["dir"]: _metrics(r["dir"]) for r in runs}
    terms = sorted({k for ms in rows.values() for m in ms for k, v in m.items()
                    if isinstance(v, float) and k not in ("lr_q", "wall_s", *CURVES) and not k.endswith("_se")})
    keys = [k for k in CURVES if any(k in m for ms in rows.values() for m in ms)] + terms
    cols, n_rows = min(3, len(keys)), math.ceil(len(keys) / min(3, len(keys)))
    fig, axes = plt.subplots(n_rows, cols, figsize=(5 * cols, 3.4 * n_rows), squeeze=False)
    warm_ends = sorted({1 + max(m["iter"] for m in ms if m.get("warmup")) for ms in rows.values()
                        if any(m.get("warmup") for m in ms)})
    labels = [_label(r) for r in runs]
    labels = [f"{lab} ({Path(r['dir']).name})" if labels.count(lab) > 1 else lab for lab, r in zip(labels, runs)]
    handles: dict[str, Any] = {}
    for ax, key in zip(axes.flat, keys, strict=False):
        for end in warm_ends:
            ax.axvspan(0, end, color="0.9", zorder=0)
        for i, run in enumerate(runs):
            pts = [(m["iter"], m[key]) for m in rows[run["dir"]] if key in m and math.isfinite(m[key])]
            if pts:
                its, vals = zip(*pts, strict=True)
                ys = list(vals) if key == "hessian_trace" else _smooth(list(vals), smooth)
                (line,) = ax.plot(its, ys, color=f"C{i % 10}", marker="o" if key == "hessian_trace" else None)
                handles.setdefault(labels[i], line)
        ax.set_title(key)
        ax.set_xlabel("iteration")
        if key in ("grad_norm", "hessian_trace", "loss_q"):
            log_scale(ax)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if warm_ends:
        handles["warm-up"] = matplotlib.patches.Patch(color="0.9")
    legend_h = 0.3 * math.ceil(len(handles) / 3) / (3.4 * n_rows)  # inches of legend rows, as a figure fraction
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(3, len(handles)), fontsize=7,
               frameon=False)
    fig.tight_layout(rect=(0, legend_h, 1, 1))
    return _save(fig, out_dir / "curves.png")


def log_scale(ax) -> None:
    """Log scale for positive curves; otherwise (a Hutchinson estimate may come out ≤ 0, older runs logged
    negative losses) symlog, linear only below the smallest typical magnitude among the lines, so a curve near
    0.06 is not flattened beside one near −900."""
    lines = [list(line.get_ydata()) for line in ax.get_lines()]
    if all(v > 0 for vals in lines for v in vals):
        ax.set_yscale("log")
        return
    nonzero = [sorted(abs(v) for v in vals if v) for vals in lines]
    typical = [mags[len(mags) // 2] for mags in nonzero if mags]  # a mostly-zero line must not make it 0
    ax.set_yscale("symlog", linthresh=min(typical) if typical else 1.0)


def _samples(run_dir: str) -> dict[str, Any] | None:
    path = Path(run_dir) / "samples.pt"
    return read_checkpoint(path) if path.exists() else None


def _show(ax, img: torch.Tensor) -> None:
    img = img.float()
    img = (img - img.min()) / (img.max() - img.min() + 1e-8)
    # a numpy array: matplotlib's copy=False on a tensor warns under NumPy 2
    ax.imshow((img[0] if img.shape[0] == 1 else img.permute(1, 2, 0)).numpy(),
              cmap="gray" if img.shape[0] == 1 else None)
    ax.set_xticks([])
    ax.set_yticks([])


def class_names(run_dir: str) -> list[str]:
    """The class names the run's student records (its teacher's dataset), or none."""
    student = Path(run_dir) / "student.pt"
    obj = read_checkpoint(student) if student.exists() else {}
    return list((obj.get("dataset") or {}).get("classes") or []) if isinstance(obj, dict) else []


def sample_title(label: int, names: list[str], width: int = 12) -> str:
    """A class by name (cut to `width` characters) where the dataset names its classes, else by number."""
    if label < len(names):
        name = names[label]
        return name if len(name) <= width else name[: width - 1] + "…"
    return str(label)


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
        names = class_names(run["dir"])
        for ax, img, y in zip(axes.flat, data["images"][:k], data["labels"][:k], strict=False):
            _show(ax, img)
            ax.set_title(sample_title(int(y), names), fontsize=7)
        for ax in list(axes.flat)[k:]:
            ax.axis("off")
        fig.suptitle(f"{source} synthetic images (their labels above)")
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

