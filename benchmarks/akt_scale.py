"""Scale of AKT's attention KLs against the logit KD term, on the proxy, before any Q-model training.

The Q model (W3A3 by default) has its activation ranges calibrated on a few generator batches, as after the
warm-up; then, on one fresh synthetic batch, each feature map's batch-mean KL (spatial and channel, τ = 8) is
compared with T²·KD, and so are the gradient norms (over the Q model's parameters) of the logit term and of
the weighted feature term. This is the measurement behind the default λ (akt.md §2): a per-map weight of 2×10⁵ makes
the feature term comparable to the logit term instead of vanishing next to it.
Prints one JSON object as its last line. Usage: python benchmarks/akt_scale.py [--bits 3] [--layers units]
"""
from __future__ import annotations

import argparse
import json

import torch

from zsq.distill import TransferInputs
from zsq.distill.akt import rfd_terms
from zsq.train import build_job, resolve_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher", default="resnet20_fmnist")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--layers", default="stages")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = resolve_config("quick", "gdfq", "akt", teacher=args.teacher, wbits=args.bits, abits=args.bits,
                         batch_size=args.batch_size, device="cpu", out="unused", seed=args.seed,
                         akt_layers=args.layers)
    job = build_job(cfg)
    job.start_epoch(0)
    for _ in range(5):  # calibrate the activation ranges on generator batches, as the warm-up does
        job.iterate(True)
    job.start_epoch(cfg.optim.warmup_epochs)
    with torch.no_grad():
        x, y = job.source.sample(args.batch_size, job.rng)
        t_logits = job.teacher(x)
    q_logits = job.qmodel(x)
    inp = TransferInputs(t_logits, q_logits, y, x, job.t_tap.take(detach=True), job.q_tap.take())
    loss, terms = job.loss_fn(inp)
    grads = {k: torch.nn.utils.get_total_norm(torch.autograd.grad(terms[k], job.q_params, retain_graph=True,
                                                                  allow_unused=True, materialize_grads=True)).item()
             for k in ("kd", "rfd")}
    per_map = {name: {k: v.item() for k, v in rfd_terms({name: inp.t_feats[name]}, {name: inp.q_feats[name]},
                                                         cfg.options.get("akt_tau", 8.0)).items()}
               for name in job.loss_fn.layers}
    for name, kls in per_map.items():
        print(f"{name:10s} spatial KL {kls['spatial']:.3e}   channel KL {kls['channel']:.3e}")
    kd, rfd = terms["kd"].item(), terms["rfd"].item()
    print(f"T²·KD {kd:.4f}   λ = {job.loss_fn.lam:.3g}: λ·RFD {rfd:.4f}   (ratio {rfd / kd:.3f})")
    print(f"gradient norm: KD {grads['kd']:.4g}   λ·RFD {grads['rfd']:.4g}   (ratio {grads['rfd'] / grads['kd']:.3g})")
    job.close()
    print(json.dumps({"bits": args.bits, "batch_size": args.batch_size, "layers": args.layers, "per_map_kl": per_map,
                      "kd": kd, "lambda": job.loss_fn.lam, "weighted_rfd": rfd, "rfd_over_kd": rfd / kd, "grad_norm": grads,
                      "grad_rfd_over_kd": grads["rfd"] / grads["kd"]}))


if __name__ == "__main__":
    main()
