"""How strongly SynQ's low-pass filter should cut at a dataset's resolution: the choice of `--synq-d0`.

For each D0: the teacher's top-1 on low-passed real test images (how much class information the filter keeps),
the share of the non-DC spectral energy it removes from real and from synthetic images, and on a synthetic set
the teacher's mean p(label) and the share of samples the selective CE keeps (difficulty < τ).
Rule recorded in the README: the default D0 is the smallest on the grid at which the teacher's real top-1 stays
within `--tolerance` points of its unfiltered top-1 (the strongest filter that keeps what the teacher needs).
Prints one JSON object as its last line.
Usage: python benchmarks/lpf_d0.py [--synth-data ~/.cache/zsq/synth/hast-....pt] [--limit 5000]
"""
from __future__ import annotations

import argparse
import json

import torch

from zsq.data import batches, normalize
from zsq.distill import low_pass, lowpass_mask
from zsq.evaluate import eval_set_for
from zsq.models import load_model
from zsq.synth.pixels import read_set


def energy_removed(x: torch.Tensor, d0: float) -> float:
    """Share of the spectral energy outside DC that the filter takes away (|1−G|-weighted, on |F|²)."""
    f = torch.fft.fftshift(torch.fft.fft2(x.double()), dim=(-2, -1)).abs().pow(2)
    h, w = x.shape[-2:]
    g = lowpass_mask(h, w, d0).double()
    f[..., h // 2, w // 2] = 0
    return float(1 - (f * g * g).sum() / f.sum())


def real_top1(teacher: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, d0: float | None) -> float:
    correct = 0
    for i in range(0, len(labels), 500):
        x = images[i:i + 500]
        x = x if d0 is None else low_pass(x, d0)
        correct += int((teacher(x).argmax(1) == labels[i:i + 500]).sum())
    return 100.0 * correct / len(labels)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="resnet20_fmnist")
    ap.add_argument("--synth-data", help="a set written by `zsq synth` (or found in the cache)")
    ap.add_argument("--d0", nargs="+", type=float, default=[2, 3, 4, 6, 8, 12, 16, 24, 40, 80])
    ap.add_argument("--limit", type=int, default=5000, help="real test images")
    ap.add_argument("--tau", type=float, default=0.5)
    ap.add_argument("--tolerance", type=float, default=1.0, help="top-1 points the filter may cost on real images")
    args = ap.parse_args()
    teacher = load_model(args.teacher).eval()
    ds = eval_set_for(teacher)
    x, y = next(batches(ds, args.limit, limit=args.limit))
    real = normalize(x, ds.info)
    synth = read_set(args.synth_data) if args.synth_data else None
    base = real_top1(teacher, real, y, None)
    rows = []
    for d0 in args.d0:
        row = {"d0": d0, "real_top1": real_top1(teacher, real, y, d0), "real_energy_removed": energy_removed(real, d0)}
        if synth is not None:
            s, sy = synth["images"].float(), synth["labels"]
            p = teacher(low_pass(s, d0)).softmax(1).gather(1, sy[:, None]).squeeze(1)
            row.update(synth_energy_removed=energy_removed(s, d0), synth_p_label=float(p.mean()),
                       selce_kept=float(((1 - p) < args.tau).float().mean()))
        rows.append(row)
    print(f"teacher top-1 on {len(y)} unfiltered real images: {base:.2f}")
    print("| D0 | real top-1 | real energy removed | synth energy removed | synth p(label) | selce kept |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['d0']:g} | {r['real_top1']:.2f} | {r['real_energy_removed']:.3f} | "
              f"{r.get('synth_energy_removed', float('nan')):.3f} | {r.get('synth_p_label', float('nan')):.3f} | "
              f"{r.get('selce_kept', float('nan')):.3f} |")
    chosen = min((r["d0"] for r in rows if r["real_top1"] >= base - args.tolerance), default=None)
    if synth is not None:
        p0 = teacher(synth["images"].float()).softmax(1).gather(1, synth["labels"][:, None]).mean()
        print(f"synthetic set unfiltered: p(label) {float(p0):.3f}")
    print(json.dumps({"teacher": args.teacher, "real_top1_unfiltered": base, "rows": rows,
                      "tolerance": args.tolerance, "chosen_d0": chosen}))


if __name__ == "__main__":
    main()
