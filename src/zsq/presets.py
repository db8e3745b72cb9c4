"""Recipes: `paper` (the published budget of the chosen data source) and `quick` (a CPU budget).

Precedence: TrainConfig defaults → preset → explicit overrides (CLI flags left unset never override).
"""
from __future__ import annotations

from typing import Any

from .errors import UserError

PAPER_COMMON: dict[str, Any] = {
    "epochs": 400,  # 400 × 200 iterations (gdfq_adadfq.md §2)
    "iters_per_epoch": 200,
    "warmup_epochs": 4,  # generator-only epochs that calibrate activation ranges
    "lr_q": 1e-4,  # SGD, Nesterov, momentum 0.9
    "lr_g": 1e-3,  # Adam (0.5, 0.999)
    "weight_decay": 1e-4,
    "milestones": [100, 200, 300],  # ×0.1 for both optimisers
}
# HAST (hast.md §3): 151 epochs, lr_q 1e-5 ×0.1 at 20/40/60, batch 64 from 5,120 stored images (the pixel
# options' defaults are the paper's synthesis budget: 1,000 Adam steps per batch of 256); the warm-up generator
# that calibrates the ranges draws batches of 16 (hast.md §1b).
HAST_PAPER: dict[str, Any] = {"epochs": 151, "lr_q": 1e-5, "milestones": [20, 40, 60], "batch_size": 64,
                              "warmup_batch": 16}
PAPER_BY_SOURCE: dict[str, dict[str, Any]] = {
    "gdfq": {"batch_size": 200},
    "adadfq": {"batch_size": 16},  # the AdaDFQ code's band loss is hard-wired to 16
    "hast": HAST_PAPER,
    "zeroq": HAST_PAPER,
    # No paper trains QAT on Genie-D images: an offline set is trained on as HAST's is; the set itself is Genie's
    # (1,024 images × 4,000 steps, the options' defaults).
    "genie": HAST_PAPER,
}
# AKT (akt.md §4): 200 epochs, ×0.1 at epoch 100, batch 200 (the CIFAR-10 figure; the paper text says 16 for
# CIFAR-100, its official config 200), whatever the data source.
AKT_PAPER: dict[str, Any] = {"epochs": 200, "milestones": [100], "batch_size": 200}
PAPER_BY_LOSS: dict[str, dict[str, Any]] = {
    "kd+ce": {"kd_reduction": "elementwise"},  # the GDFQ code's nn.KLDivLoss() mean over B·C elements
    "akt": AKT_PAPER,
    "akt-spatial": AKT_PAPER,
    "akt-channel": AKT_PAPER,
    "hast": {"promote": 0.01},  # FGSM ε of the HAST code (hast.md §2.6)
    "synq": {"promote": 0.01},  # SynQ keeps HAST's promotion (synq.md §5); its CIFAR budget is not published
    "akt+synq": {"promote": 0.01},
}

# CPU budget for ResNet-20 on Fashion-MNIST: 600 iterations at batch 64, the first 100 generator-only warm-up,
# about 15 minutes on an idle 2-core AVX2 EPYC (README). Kept against the alternatives measured at W3A3 (seed 0,
# docs/results/fmnist-quick.md): a half-width generator with 1,000 iterations, and lr_q 3e-4; both ended lower for
# GDFQ and AdaDFQ.
QUICK: dict[str, Any] = {
    "epochs": 6,
    "iters_per_epoch": 100,
    "warmup_epochs": 1,
    "batch_size": 64,
    "lr_q": 1e-3,  # a short budget needs a larger step than the paper's 1e-4
    "lr_g": 1e-3,
    "weight_decay": 1e-4,
    "milestones": [4],
    # Activation ranges from the teacher's BatchNorm statistics, with the clipped STE
    # (docs/results/activation-ranges.md: plain KD at W3A3 over 5 seeds 90.56 ± 0.51 against ema-minmax's 80.70 ±
    # 4.89, whose seeds collapse). The bound at 2.5 standard deviations: with both plain KD and AKT it raised the
    # worst of 5 seeds over k = 3 (KD 90.51 against 89.85, AKT 91.52 against 90.71) and narrowed their spread.
    "act_range": "bn-prior",
    "ste": "clipped",
    "bn_k": 2.5,
}

# Offline sets on the CPU: 512 images × 100 pixel steps (200 steps at batch 256) before training starts.
# A first choice, not tuned yet.
QUICK_BY_SOURCE: dict[str, dict[str, Any]] = {
    "hast": {"synth_images": 512, "synth_iters": 100},
    "zeroq": {"synth_images": 512, "synth_iters": 100},
    # Genie-D: 2 batches of 128 × 100 steps. A step (generator + teacher, batch 128) cost 1.8 s on one core
    # beside a training run (ResNet-20, 32×32): about 6 minutes.
    "genie": {"synth_images": 256, "synth_iters": 100},
}

# The hast loss is 20·T²·KD + 1000·FA, with Q-model gradient norms in the thousands: its code's lr_q 1e-5 is kept,
# since 1e-3 and 1e-4 diverged within 50 steps at W3A3 (seed 0). AKT's official λ (2e5 per map) with the quick lr_q
# 1e-3 diverged at W3A3 (NaN at step 124, docs/results/akt.md); λ 1e4 gives the RFD and KD gradients about equal norms
# at the start (benchmarks/akt_scale.py).
AKT_QUICK: dict[str, Any] = {"akt_lambda": 1e4}
QUICK_BY_LOSS: dict[str, dict[str, Any]] = {
    "hast": {"promote": 0.01, "lr_q": 1e-5},
    "synq": {"promote": 0.01, "lr_q": 1e-5},  # the same 20·T²·KD scale as hast
    # λ 2e5: RFD over KD as in the quick akt (1e4 against a KD weight of 1; synq weighs KD by 20)
    "akt+synq": {"promote": 0.01, "lr_q": 1e-5, "akt_lambda": 2e5},
    # AKT carries BN statistics as moments (docs/results/activation-ranges.md: W3A3, 5 seeds, k = 2.5, every seed within
    # 4 points of FP; bounds, k = 3: 91.03 ± 0.49); KD + CE kept bounds (90.05 ± 2.05 with moments, k = 3).
    "akt": {**AKT_QUICK, "bn_propagate": "moments"},
    # KD + CE (README's "plain KD" rows before the rename) takes its ranges from the 99.7th percentile of the
    # warm-up's synthetic images (docs/results/activation-ranges.md: W3A3, 5 seeds, every seed within 4 points of FP,
    # where the BN prior left 3 of 5 below; at 99.7 the median range matches the real-data oracle's, at 99.9 it is
    # about 1.25 times as wide).
    "kd+ce": {"act_range": "percentile", "act_percentile": 99.7},
    "akt-spatial": AKT_QUICK,
    "akt-channel": AKT_QUICK,
}

PRESETS = ("paper", "quick")

# Post-training quantization (zsq ptq, ptq.md §4.3, §7). paper: Genie's code, 1,024 images, 20,000 steps per unit
# at batch 32, each offline set at its own paper budget. quick: 256 images; see docs/results/ptq.md for how
# the budget was chosen.
PTQ_PAPER: dict[str, Any] = {"images": 1024, "iters_per_unit": 20000}
PTQ_QUICK: dict[str, Any] = {"images": 256, "iters_per_unit": 300}
PTQ_QUICK_BY_SOURCE: dict[str, dict[str, Any]] = {"genie": {"synth_iters": 100}, "hast": {"synth_iters": 100},
                                                  "zeroq": {"synth_iters": 100}}


def preset_values(preset: str, source: str, loss: str) -> dict[str, Any]:
    if preset == "quick":
        return {**QUICK, **QUICK_BY_SOURCE.get(source, {}), **QUICK_BY_LOSS.get(loss, {})}
    if preset == "paper":
        return {**PAPER_COMMON, **PAPER_BY_SOURCE.get(source, {}), **PAPER_BY_LOSS.get(loss, {})}
    raise UserError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")


def ptq_preset_values(preset: str, source: str) -> dict[str, Any]:
    if preset == "quick":
        return {**PTQ_QUICK, **PTQ_QUICK_BY_SOURCE.get(source, {})}
    if preset == "paper":
        return dict(PTQ_PAPER)
    raise UserError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
