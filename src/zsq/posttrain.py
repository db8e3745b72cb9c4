"""`zsq ptq`: data-free post-training quantization as a run. A small image set (Genie-D, HAST or ZeroQ images
distilled from the teacher, or real training images as an upper bound that uses data), then block reconstruction
(`zsq.recon`), then the same evaluation, health check and files as `zsq quantize`: config.json, metrics.jsonl (one
row per unit: its output error before and after), result.json (`method: "ptq"`), student.pt. A killed run resumes
at the unit it was fitting.
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import load_dataset, normalize
from .device import deterministic, resolve_device
from .errors import UserError
from .evaluate import eval_set_for, evaluate
from .io import save_json, save_torch
from .models import load_model, model_name, save_checkpoint
from .presets import ptq_preset_values
from .provenance import RunClock, code_version, hardware
from .quant import QuantConfig, act_quantizers, default_placement, float_tensors
from .recon import USER_NAMES, ReconConfig, reconstruct
from .rundir import clear_run, open_run
from .synth import SOURCES, SourceContext, create_source
from .train import Result, available_cores, current_config
from .validate import ProbeOptions, health, probe_set

REAL = "real"  # training images of the teacher's dataset: not data-free, the upper bound a PTQ table quotes
PTQ_SOURCES = ("genie", "hast", "zeroq", REAL)


@dataclass
class PtqConfig:
    teacher: str = "resnet20_fmnist"  # shipped teacher, architecture (+ checkpoint) or checkpoint path
    checkpoint: str | None = None
    model_def: str | None = None  # FILE.py:FACTORY building a user's teacher module
    source: str = "genie"  # the images: an offline data source, or "real"
    preset: str = "quick"
    wbits: int = 4
    abits: int = 4
    first_last: str = "8bit"  # first and last layer's weights at 8 bits (Genie's and BRECQ's tables) or "same"
    placement: str | None = None  # activation quantizers; None: lineage for a registered model, else deployable
    images: int = 256  # images the units are fitted on (for an offline source, the size of its set)
    recon: ReconConfig = field(default_factory=ReconConfig)
    units: list[str] | None = None  # module names of the blocks; default: read from the graph
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    deterministic: bool = False  # deterministic algorithms, so that a resumed run ends identical (zsq.device)
    dataset: str | None = None
    data_dir: str | None = None
    eval_limit: int | None = None
    probe_images: int = ProbeOptions.probe_images
    probe_iters: int = ProbeOptions.probe_iters
    out: str = "runs/ptq"
    options: dict[str, Any] = field(default_factory=dict)  # the offline source's options (synth_iters, ...)

    def __post_init__(self) -> None:
        if isinstance(self.recon, dict):
            self.recon = ReconConfig(**self.recon)
        if self.source not in PTQ_SOURCES:
            raise UserError(f"PTQ images come from {', '.join(PTQ_SOURCES)}, not '{self.source}' (an online "
                            f"generator trains beside a QAT student: use zsq quantize)")
        if self.images < 1:
            raise UserError(f"images must be ≥ 1, got {self.images}")
        if self.threads < 0:
            raise UserError(f"threads must be ≥ 1 (or 0: the cores this process may use), got {self.threads}")
        own = set() if self.source == REAL else {f.name for f in dataclasses.fields(
            SOURCES.options_class(self.source))}
        for name in self.options:
            if name == "synth_images":
                raise UserError("--synth-images: the set's size is --images under zsq ptq")
            if name not in own or name == "warmup_batch":  # no QAT warm-up here
                raise UserError(f"--{name.replace('_', '-')} does not apply to --source {self.source}")
        self.quant()
        self.probe()

    def quant(self) -> QuantConfig:
        return QuantConfig(wbits=self.wbits, abits=self.abits, first_last=self.first_last,
                           placement=self.placement or "lineage", weight_range="fixed")

    def probe(self) -> ProbeOptions:
        return ProbeOptions(self.probe_images, self.probe_iters)

    def source_options(self) -> dict[str, Any]:
        return {**self.options, "synth_images": self.images, "synth_seed": self.seed}


RECON_FLAGS = {USER_NAMES.get(f.name, f.name): f.name for f in dataclasses.fields(ReconConfig)}


def resolve_ptq_config(preset: str = "quick", source: str = "genie", **overrides: Any) -> PtqConfig:
    """Defaults → preset → overrides (None = not given). Reconstruction settings by name (`iters_per_unit` for
    ReconConfig.iters, `recon_loss` for its loss), the source's options by their own names."""
    values = {**ptq_preset_values(preset, source), **{k: v for k, v in overrides.items() if v is not None}}
    own = {f.name for f in dataclasses.fields(PtqConfig)} - {"recon", "options"}
    recon = {RECON_FLAGS[k]: values.pop(k) for k in list(values) if k in RECON_FLAGS}
    top = {k: values.pop(k) for k in list(values) if k in own}
    options = {**values.pop("options", {}), **values}
    return PtqConfig(preset=preset, source=source, recon=ReconConfig(**recon), options=options, **top)


def config_dict(cfg: PtqConfig) -> dict[str, Any]:
    """config.json: the resolved config, with `method: "ptq"`, so that runs of both families share a store."""
    return json.loads(json.dumps({**asdict(cfg), "method": "ptq"}))


def _images(cfg: PtqConfig, teacher: nn.Module, info: Any, device: str, quiet: bool) -> tuple[torch.Tensor, dict]:
    """The images the units are fitted on, in the teacher's input space, and facts about them for result.json."""
    if cfg.source == REAL:
        train = load_dataset(info.name, "train", cfg.data_dir, image_size=info.image_size)
        if cfg.images > len(train):
            raise UserError(f"--images {cfg.images}: {info.name}'s training split has {len(train)}")
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))[: cfg.images]
        return normalize(train.take(idx), info).to(device), {"uses_data": True, "real_images": cfg.images}
    ctx = SourceContext(teacher, info.num_classes, info.in_channels, info.image_size, device, quiet)
    source = create_source(cfg.source, ctx, cfg.source_options())
    if len(source.images) < cfg.images:
        raise UserError(f"{source.path} holds {len(source.images)} images, fewer than --images {cfg.images}")
    return source.images[: cfg.images], {"uses_data": False, **source.describe()}


def ptq_run(cfg: PtqConfig, teacher: nn.Module | None = None, resume: bool = False, restart: bool = False,
            quiet: bool = False) -> Result:
    """Run (or resume) one post-training quantization job and write its run folder. A `teacher` module is
    copied: the user's module keeps its mode, gradients and device."""
    cfg = dataclasses.replace(cfg, threads=cfg.threads or available_cores())
    device = resolve_device(cfg.device)
    if cfg.deterministic:
        deterministic()
    out = Path(cfg.out)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        if teacher is None:
            teacher = load_model(cfg.teacher, checkpoint=cfg.checkpoint, model_def=cfg.model_def)
        else:
            teacher = copy.deepcopy(teacher)
        if cfg.placement is None:
            cfg = dataclasses.replace(cfg, placement=default_placement(teacher))
        state = open_run(out, config_dict(cfg), resume, restart, as_now=current_config)
        test_set = eval_set_for(teacher, cfg.dataset, cfg.data_dir)
        info = test_set.info
        teacher = teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        print(f"zsq ptq: {model_name(teacher)} W{cfg.wbits}A{cfg.abits} ({cfg.placement}, first/last "
              f"{cfg.first_last}), {cfg.images} {cfg.source} images, {cfg.recon.iters} steps per unit, preset "
              f"{cfg.preset} on {device}, {cfg.threads} thread(s) → {out}", flush=True)
        if cfg.source == REAL:
            print(f"note: --source real fits on {cfg.images} training images of {info.name}: it uses data (an upper "
                  f"bound for the data-free rows), result.json says so (uses_data)", flush=True)
        images, facts = _images(cfg, teacher, info, device, quiet)
        ctx = SourceContext(teacher, info.num_classes, info.in_channels, info.image_size, device, quiet)
        probe = probe_set(ctx, cfg.probe()).to(device)
        # the reconstruction's own time; a synthetic set built for it says its own (synthetic_set_build_s)
        clock = RunClock(state["wall_s"], state.get("cpu_s")) if state is not None else RunClock()
        if state is None:
            clear_run(out)
            save_json(config_dict(cfg), out / "config.json")
            (out / "metrics.jsonl").write_text("")
        else:
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
            kept = [r for r in rows if r["unit"] < state["units_done"]]
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
            if not quiet:
                print(f"resuming {out} after unit {state['units_done']}")

        def unit_done(k: int, record: dict, progress: dict) -> None:
            wall = clock.wall()
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"unit": k, **record, "wall_s": round(wall, 3)}) + "\n")
            save_torch({**progress, "wall_s": wall, "cpu_s": clock.cpu()}, out / "state.pt")

        student = reconstruct(teacher, images, cfg.quant(), cfg.recon, cfg.units, cfg.seed, not quiet,
                              unit_done, state)
        return _write_results(cfg, teacher, student, test_set, probe, facts, clock.wall(), clock.cpu(), device)
    finally:
        torch.set_num_threads(threads_before)


def _write_results(cfg: PtqConfig, teacher: nn.Module, student: nn.Module, test_set: Any, probe: torch.Tensor,
                   facts: dict[str, Any], wall: float, cpu: float | None, device: str) -> Result:
    out = Path(cfg.out)
    h = health(teacher, student, probe, device)
    fp = evaluate(teacher, test_set, device=device, limit=cfg.eval_limit)
    q = evaluate(student, test_set, device=device, limit=cfg.eval_limit)
    save_checkpoint(student.cpu(), out / "student.pt", test_set.info, {"top1": q["top1"], "top5": q["top5"]},
                    quant=student.zsq_quant)
    student.to(device)
    student.zsq_dataset = test_set.info
    if cfg.teacher == "module":
        save_checkpoint(teacher.cpu(), out / "teacher.pt", test_set.info, {"top1": fp["top1"]})
        teacher.to(device)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = {"fp_top1": fp["top1"], "q_top1": q["top1"], "q_top5": q["top5"], "eval_images": q["n"],
               "wbits": cfg.wbits, "abits": cfg.abits, "source": cfg.source, "method": "ptq",
               "preset": cfg.preset, "iterations": cfg.recon.iters * len(rows), "units": [r["name"] for r in rows],
               "wall_s": wall, "cpu_s": cpu, "seed": cfg.seed, "device": device, "hardware": hardware(device),
               "torch": str(torch.__version__),
               "dataset": test_set.info.name, "model": model_name(teacher), "code": code_version(), **facts,
               "act_ranges": [[a.lo.item(), a.hi.item()] for a in act_quantizers(student)],
               "placement": cfg.placement, "first_last": cfg.first_last, "float_tensors": float_tensors(student),
               "select": "final", "health": h.summary()}
    save_json(summary, out / "result.json")
    (out / "state.pt").unlink(missing_ok=True)
    return Result(fp["top1"], q["top1"], out, student, summary)


def ptq(teacher: str | nn.Module = "resnet20_fmnist", wbits: int = 4, abits: int = 4, source: str = "genie",
        preset: str = "quick", resume: bool = False, restart: bool = False, quiet: bool = False,
        **overrides: Any) -> Result:
    """Python entry point: `zsq.ptq("resnet20_fmnist", wbits=4, abits=4, source="genie", out="runs/p")`.
    `teacher` is a name/path (as for `zsq.load_model`) or any `nn.Module` classifier (then pass `dataset=`)."""
    module = teacher if isinstance(teacher, nn.Module) else None
    if module is not None and getattr(module, "zsq_model_def", None):
        overrides.setdefault("model_def", module.zsq_model_def)
    cfg = resolve_ptq_config(preset, source, teacher="module" if module is not None else str(teacher),
                             wbits=wbits, abits=abits, **overrides)
    return ptq_run(cfg, teacher=module, resume=resume, restart=restart, quiet=quiet)
