"""Denoiser registry: named factories (the CLI's choices) and `build_model` from a data shape.

Every model is called as model(x, logsnr, y=None) and returns a tensor shaped like x.
"""
from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

from adaptive_sched.config import suggest
from adaptive_sched.errors import UsageError
from adaptive_sched.models.embedding import LogSNREmbedding
from adaptive_sched.models.mlp import MLPDenoiser
from adaptive_sched.models.unet import UNet

__all__ = ["MODELS", "names", "build_model", "constructor_params", "params_for_weights", "count_parameters", "num_classes_of", "LogSNREmbedding", "MLPDenoiser", "UNet"]

MODELS: dict[str, Callable[..., nn.Module]] = {"mlp": MLPDenoiser, "unet": UNet}

# Constructor arguments each model takes from the per-example data shape (not user-settable).
_SHAPE_ARGS: dict[str, Callable[[tuple[int, ...]], dict]] = {
    "mlp": lambda shape: {"dim": shape[0]},
    "unet": lambda shape: {"in_channels": shape[0], "image_size": (shape[1], shape[2])},
}
_SHAPE_NDIM = {"mlp": 1, "unet": 3}


def names() -> list[str]:
    """Registered model names, plus "auto" (unet for (C, H, W) data, mlp otherwise)."""
    return [*MODELS, "auto"]


def resolve_name(name: str, data_shape: tuple[int, ...]) -> str:
    """The model a name builds for data of this shape ("auto": unet for (C, H, W) data, mlp otherwise)."""
    if name == "auto":
        return "unet" if len(data_shape) == 3 else "mlp"
    return name


def user_parameters(name: str, shape_args: dict) -> dict[str, inspect.Parameter]:
    """The constructor parameters of model `name` a user may set: all but the shape's and num_classes."""
    return {k: p for k, p in inspect.signature(MODELS[name]).parameters.items()
            if k not in shape_args and k != "num_classes"}


def check_options(name: str, params: dict) -> None:
    """UsageError for an unknown model name, or an option no model of that name takes (checked before the data's
    shape is known: "auto" accepts the options of either model)."""
    if name not in names():
        raise UsageError(f"unknown model {name!r}{suggest(name, names())}; choose one of: {', '.join(names())}")
    valid = {k for m in (MODELS if name == "auto" else [name])
             for k in user_parameters(m, _SHAPE_ARGS[m]((1,) * _SHAPE_NDIM[m]))}    # any shape names the same keys
    unknown = sorted(set(params) - valid)
    if unknown:
        raise UsageError(f"unknown option {unknown[0]!r} for model {name!r}{suggest(unknown[0], sorted(valid))}; "
                         f"valid options: {', '.join(sorted(valid))}")


def constructor_params(name: str, data_shape: tuple[int, ...], params: dict) -> dict:
    """Every user-settable constructor argument of the model, `params` over the constructor's defaults: what a
    snapshot records, so that changing a default later cannot change how an old run loads."""
    name = resolve_name(name, tuple(data_shape))
    defaults = {k: p.default for k, p in user_parameters(name, _SHAPE_ARGS[name](tuple(data_shape))).items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **params}


def build_model(name: str, data_shape: tuple[int, ...], num_classes: int = 0, **kwargs) -> nn.Module:
    """Build model `name` for per-example shape (D,) or (C, H, W); kwargs go to its constructor."""
    data_shape = tuple(int(s) for s in data_shape)
    name = resolve_name(name, data_shape)
    check_options(name, kwargs)
    if len(data_shape) != _SHAPE_NDIM[name]:
        want = "(D,)" if _SHAPE_NDIM[name] == 1 else "(C, H, W)"
        raise UsageError(f"model {name!r} needs data of shape {want}, got {data_shape}; try model 'auto'")
    shape_args = _SHAPE_ARGS[name](data_shape)
    try:
        return MODELS[name](**shape_args, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError, RuntimeError) as err:     # e.g. hidden = -3 or "wide": torch refuses the size
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise UsageError(f"model {name!r} cannot be built with {kwargs}: {first}") from None


def params_for_weights(name: str, params: dict, state: dict) -> dict:
    """For snapshots without recorded constructor_params (older ones): `params` plus what their configs left to a
    default that has changed since, read off the weights: a U-Net's mid_blocks (was 2, now 1) = its mid.<i> blocks."""
    params = dict(params)
    if name == "unet" and "mid_blocks" not in params:
        params["mid_blocks"] = len({key.split(".")[1] for key in state if key.startswith("mid.")})
    return params


def num_classes_of(model: nn.Module) -> int:
    """The number of classes a denoiser was built for (0: unconditional); its null class has this index."""
    embed = getattr(getattr(model, "module", model), "embed", None)     # DDP wraps the model as .module
    return int(getattr(embed, "num_classes", 0))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
