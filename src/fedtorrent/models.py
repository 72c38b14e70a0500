"""Models by short name: logistic regression, MLP and two small CNNs, plus any module factory.

Every factory takes keyword-only ``input_shape`` (one example's shape, e.g. ``(1, 28, 28)``) and
``num_classes`` and returns an ``nn.Module`` mapping a ``(N, *input_shape)`` float batch to
``(N, num_classes)`` logits. None uses batch norm or other running buffers, so a model's state is
its parameters, which is what peers average. Weights come from torch's global generator: call
``torch.manual_seed`` first to build the same model twice.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from torch import nn

from fedtorrent.errors import ConfigError, UnknownNameError

F = TypeVar("F", bound=Callable[..., nn.Module])
ModelFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[F], F]:
    """Register a factory under ``name``; it is called as ``factory(input_shape=, num_classes=)``.

    Raises:
        ConfigError: ``name`` is already taken.
    """

    def decorate(factory: F) -> F:
        if name in _REGISTRY:
            raise ConfigError(f"model name {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def model_names() -> tuple[str, ...]:
    """The registered names, sorted."""
    return tuple(sorted(_REGISTRY))


def build_model(
    model: str | Callable[..., nn.Module],
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    **kwargs: Any,
) -> nn.Module:
    """Build a model from a registered name or from any callable returning an ``nn.Module``.

    A callable is called with ``input_shape``, ``num_classes`` and ``kwargs`` when its signature
    accepts them, else with no arguments (only when ``kwargs`` is empty).

    Raises:
        UnknownNameError: ``model`` is a name that is not registered.
        ConfigError: bad shape or class count, arguments the factory does not take, or a factory
            that does not return an ``nn.Module``.
    """
    shape = tuple(input_shape)
    if not shape or not all(isinstance(d, int) and d >= 1 for d in shape):
        raise ConfigError(f"input_shape must be positive integers, got {input_shape!r}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if isinstance(model, str):
        if model not in _REGISTRY:
            raise UnknownNameError("model", model, model_names())
        factory, label = _REGISTRY[model], repr(model)
    elif callable(model):
        factory, label = model, getattr(model, "__qualname__", repr(model))
    else:
        raise ConfigError(f"model must be a name or a callable, got {type(model).__name__}")
    full = {"input_shape": shape, "num_classes": num_classes, **kwargs}
    if _accepts(factory, full):
        net = factory(**full)
    elif not kwargs and _accepts(factory, {}):
        net = factory()
    else:
        raise ConfigError(f"model {label} does not accept the arguments {sorted(full)}")
    if not isinstance(net, nn.Module):
        raise ConfigError(f"model {label} returned {type(net).__name__}, not a torch.nn.Module")
    return net


def _accepts(factory: Callable[..., Any], arguments: dict[str, Any]) -> bool:
    try:
        inspect.signature(factory).bind(**arguments)
    except TypeError:
        return False
    except ValueError:  # no introspectable signature: let the call decide
        return True
    return True


def _image_shape(
    input_shape: tuple[int, ...], *, smallest: int, model: str, hidden: int
) -> tuple[int, int, int]:
    if not isinstance(hidden, int) or hidden < 1:
        raise ConfigError(f"model {model!r} hidden size must be a positive integer, got {hidden!r}")
    if len(input_shape) != 3 or min(input_shape[1:]) < smallest:
        raise ConfigError(
            f"model {model!r} needs (C, H, W) input with H, W >= {smallest}, got {input_shape}"
        )
    channels, height, width = input_shape
    return channels, height, width


@register_model("logreg")
def logreg(*, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression (the seed paper's model): flatten, one linear layer."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


@register_model("mlp")
def mlp(
    *, input_shape: tuple[int, ...], num_classes: int, hidden: int | Sequence[int] = (200,)
) -> nn.Module:
    """Fully connected ReLU network with ``hidden`` layer widths (an int is one layer)."""
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    if not all(isinstance(w, int) and w >= 1 for w in widths):
        raise ConfigError(f"mlp hidden sizes must be positive integers, got {hidden!r}")
    layers: list[nn.Module] = [nn.Flatten()]
    previous = math.prod(input_shape)
    for width in widths:
        layers += [nn.Linear(previous, width), nn.ReLU()]
        previous = width
    layers.append(nn.Linear(previous, num_classes))
    return nn.Sequential(*layers)


@register_model("cnn")
def cnn(*, input_shape: tuple[int, ...], num_classes: int, hidden: int = 128) -> nn.Module:
    """Small CNN for 28x28 grey images: two 5x5 conv + 2x2 max-pool blocks (16, 32), one hidden.

    About 215k parameters on 1x28x28; any (C, H, W) with H, W >= 4 works.
    """
    channels, height, width = _image_shape(input_shape, smallest=4, model="cnn", hidden=hidden)
    return nn.Sequential(
        nn.Conv2d(channels, 16, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (height // 4) * (width // 4), hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


@register_model("cnn32")
def cnn32(*, input_shape: tuple[int, ...], num_classes: int, hidden: int = 128) -> nn.Module:
    """Small CNN for 32x32 colour images: three 3x3 conv + 2x2 max-pool blocks (32, 64, 64).

    About 190k parameters on 3x32x32; any (C, H, W) with H, W >= 8 works.
    """
    channels, height, width = _image_shape(input_shape, smallest=8, model="cnn32", hidden=hidden)
    return nn.Sequential(
        nn.Conv2d(channels, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 64, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * (height // 8) * (width // 8), hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
