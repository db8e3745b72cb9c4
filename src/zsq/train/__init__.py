"""The zero-shot quantization loop: any data source × any transfer loss × a recipe (`zsq quantize`).

- `config`: the recipe, `TrainConfig`, resolved from defaults, preset and the user's values;
- `job`: `build_job(cfg)`, what one run trains, and what one iteration does (`Job.start_epoch`, `Job.iterate`);
- `loop`: `quantize_run` / `quantize`, the epochs with checkpoints, guards, range freezing and health checks;
- `folder`: the run folder (config.json, metrics.jsonl, state.pt, student.pt, result.json) and the result.

Under torchrun (zsq.dist) the Q model, and the generator where one trains, are wrapped in DistributedDataParallel:
each rank draws its own batch (seed + rank·stride), gradients are averaged, activation ranges are averaged when
they freeze, logged terms are averaged over ranks, and only the main rank writes files or prints.
"""
from .config import (SELECT, ChecksConfig, OptimConfig, RangeConfig, RunConfig, TrainConfig, config_dict,
                     current_config, flat_defaults, flat_fields, inapplicable, plugin_fields, resolve_config,
                     with_range_defaults)
from .folder import Result, available_cores
from .job import Job, build_job
from .loop import quantize, quantize_run

__all__ = ["SELECT", "ChecksConfig", "Job", "OptimConfig", "RangeConfig", "Result", "RunConfig", "TrainConfig",
           "available_cores", "build_job", "config_dict", "current_config", "flat_defaults", "flat_fields",
           "inapplicable", "plugin_fields", "quantize", "quantize_run", "resolve_config", "with_range_defaults"]
