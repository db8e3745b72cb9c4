"""The model registry and `create_model`, timm-style: a factory per architecture, created by name."""
from __future__ import annotations

import re
from typing import Callable

from torch import nn

from ..errors import UserError
from ..registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("model")


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    return MODELS.register()(fn)


def list_models(pattern: str = "*") -> list[str]:
    return MODELS.names(pattern)


def model_name(model: nn.Module) -> str:
    """The registered architecture of a model, or its class name for any other module (for reports)."""
    return getattr(model, "zsq_arch", None) or type(model).__name__


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered architecture. Arguments that are None are dropped, so CLI flags left unset never
    override an architecture's own defaults."""
    factory = MODELS.get(name)
    try:
        model = factory(**{k: v for k, v in kwargs.items() if v is not None})
    except TypeError as e:  # an argument the architecture does not take (e.g. width_mult for a ResNet)
        arg = re.search(r"argument '(\w+)'", str(e))
        if arg is None:
            raise
        raise UserError(f"model {name} takes no argument '{arg[1]}'") from None
    model.zsq_arch = name  # lets checkpoints (and quantized copies, which deep-copy it) name their architecture
    return model
