"""A user's own architecture, named on the command line as `--model-def FILE.py:FACTORY`.

Checkpoints are loaded with `weights_only=True`, so a state_dict alone never runs code; the architecture of a
module zsq does not register comes from the user's own file, imported only when they name it (a run records the
name in config.json and its student.pt, so that later commands on that run find it again).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Callable

from torch import nn

from ..errors import UserError


def model_factory(spec: str) -> Callable[[], nn.Module]:
    """FACTORY from FILE.py: a callable that builds the module with no arguments."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not name.isidentifier():
        raise UserError(f"--model-def takes FILE.py:FACTORY (a function or class in FILE.py that builds the model "
                        f"with no arguments), got '{spec}'")
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--model-def {spec}: {file} not found")
    module_name = f"zsq_model_def_{abs(hash(str(file.resolve())))}"
    module = sys.modules.get(module_name)
    if module is None:
        loader = importlib.util.spec_from_file_location(module_name, file)
        module = importlib.util.module_from_spec(loader)
        try:
            loader.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - the user's file: say where it failed, in one line
            raise UserError(f"--model-def {spec}: importing {file} raised {type(e).__name__}: {e}") from None
        sys.modules[module_name] = module
    factory = getattr(module, name, None)
    if not callable(factory):
        raise UserError(f"--model-def {spec}: {file} defines no function or class '{name}'")
    return factory


def build_model_def(spec: str) -> nn.Module:
    """The module FACTORY builds, marked with the spec (its checkpoints and runs record it)."""
    try:
        model = model_factory(spec)()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's code
        raise UserError(f"--model-def {spec}: calling it raised {type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--model-def {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    model.zsq_model_def = spec
    return model
