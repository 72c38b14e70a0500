"""Models by short name: logistic regression, MLP and two small CNNs, plus any module factory.

Every factory takes keyword-only ``input_shape`` (one example's shape, e.g. ``(1, 28, 28)``) and
``num_classes`` and returns an ``nn.Module`` mapping a ``(N, *input_shape)`` float batch to
``(N, num_classes)`` logits. None uses batch norm or other running buffers, so a model's state is
its parameters, which is what peers average. Weights come from torch's global generator: call
``torch.manual_seed`` first to build the same model twice.

Model arguments often come from a torrent, which anyone can write, so a model's size is known
before it is built: each built-in name has a formula for its state's bytes
(:func:`state_bytes`, no torch needed), and :func:`build_model` refuses a model larger than its
``max_state_bytes`` before allocating anything (names without a formula are measured on torch's
meta device, which allocates nothing). Importing this module does not import torch.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from fedtorrent.errors import ConfigError, UnknownNameError

if TYPE_CHECKING:
    from torch import nn

MAX_STATE_BYTES = 1 << 30
"""A model built from a name never holds more state than this (equal to the state codec's cap)."""
MAX_LAYERS = 64
"""Hidden layers an ``mlp`` may have."""
_FLOAT_BYTES = 4

F = TypeVar("F", bound="Callable[..., nn.Module]")
ModelFactory = Callable[..., "nn.Module"]
SizeFormula = Callable[..., int]
"""``formula(input_shape=, num_classes=, **kwargs)``: parameter count, arguments checked."""

_REGISTRY: dict[str, ModelFactory] = {}
_SIZES: dict[str, SizeFormula] = {}


def register_model(name: str, *, parameters: SizeFormula | None = None) -> Callable[[F], F]:
    """Register a factory under ``name``; it is called as ``factory(input_shape=, num_classes=)``.

    ``parameters``, when given, counts the model's parameters from the same arguments without
    building it (a test keeps each built-in's formula equal to its real count).

    Raises:
        ConfigError: ``name`` is already taken.
    """

    def decorate(factory: F) -> F:
        if name in _REGISTRY:
            raise ConfigError(f"model name {name!r} is already registered")
        _REGISTRY[name] = factory
        if parameters is not None:
            _SIZES[name] = parameters
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
    max_state_bytes: int = MAX_STATE_BYTES,
    **kwargs: Any,
) -> nn.Module:
    """Build a model from a registered name or from any callable returning an ``nn.Module``.

    A callable is called with ``input_shape``, ``num_classes`` and ``kwargs`` when its signature
    accepts them, else with no arguments (only when ``kwargs`` is empty). A registered name is
    first sized (by its formula, else on torch's meta device) and refused when its state would
    exceed ``max_state_bytes`` (a peer passes the size of the state its torrent pins), so
    arguments from a stranger's torrent cannot make it allocate a huge model. A callable is the
    user's own code and is built as it is.

    Raises:
        UnknownNameError: ``model`` is a name that is not registered.
        ConfigError: bad shape or class count, arguments the factory does not take, a state over
            ``max_state_bytes``, or a factory that does not return an ``nn.Module``.
    """
    if isinstance(model, str):
        size = state_bytes(model, input_shape=input_shape, num_classes=num_classes, **kwargs)
        if size is None:
            size = _meta_state_bytes(model, input_shape, num_classes, kwargs)
        if size > max_state_bytes:
            raise ConfigError(
                f"model {model!r} with arguments {_clip(repr(kwargs))} would hold {size} bytes "
                f"of state, more than the {max_state_bytes} allowed"
            )
    return _build(model, input_shape=input_shape, num_classes=num_classes, **kwargs)


def state_bytes(
    model: str, *, input_shape: tuple[int, ...], num_classes: int, **kwargs: Any
) -> int | None:
    """Bytes of float32 parameters the named model would hold, from its formula; no torch.

    Returns None for a registered name without a formula.

    Raises:
        UnknownNameError: not a registered name.
        ConfigError: arguments the model refuses (the same checks its factory makes).
    """
    if model not in _REGISTRY:
        raise UnknownNameError("model", model, model_names())
    formula = _SIZES.get(model)
    if formula is None:
        return None
    shape = _check_shape(input_shape, num_classes)
    full = {"input_shape": shape, "num_classes": num_classes, **kwargs}
    if not _accepts(formula, full):
        raise ConfigError(f"model {model!r} does not accept the arguments {sorted(full)}")
    return _FLOAT_BYTES * formula(**full)


def _meta_state_bytes(
    model: str, input_shape: tuple[int, ...], num_classes: int, kwargs: dict[str, Any]
) -> int:
    """The state's bytes of a model built on torch's meta device: shapes, no storage."""
    import torch  # noqa: PLC0415

    try:
        with torch.device("meta"):
            net = _build(model, input_shape=input_shape, num_classes=num_classes, **kwargs)
    except ConfigError:
        raise
    except (RuntimeError, TypeError, ValueError, OverflowError) as exc:
        first = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise ConfigError(f"model {model!r} cannot be built: {_clip(first)}") from None
    return sum(t.numel() * t.element_size() for t in net.state_dict().values())


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _check_shape(input_shape: tuple[int, ...], num_classes: int) -> tuple[int, ...]:
    shape = tuple(input_shape)
    if not shape or not all(isinstance(d, int) and d >= 1 for d in shape):
        raise ConfigError(f"input_shape must be positive integers, got {input_shape!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ConfigError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    return shape


def _build(
    model: str | Callable[..., nn.Module],
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    **kwargs: Any,
) -> nn.Module:
    from torch import nn  # noqa: PLC0415

    shape = _check_shape(input_shape, num_classes)
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
    if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
        raise ConfigError(
            f"model {model!r} hidden size must be a positive integer, got {_clip(repr(hidden))}"
        )
    if len(input_shape) != 3 or min(input_shape[1:]) < smallest:
        raise ConfigError(
            f"model {model!r} needs (C, H, W) input with H, W >= {smallest}, got {input_shape}"
        )
    channels, height, width = input_shape
    return channels, height, width


def _mlp_widths(hidden: int | Sequence[int]) -> list[int]:
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    if len(widths) > MAX_LAYERS:
        raise ConfigError(f"mlp takes at most {MAX_LAYERS} hidden layers, got {len(widths)}")
    if not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
        raise ConfigError(f"mlp hidden sizes must be positive integers, got {_clip(repr(hidden))}")
    return widths


def _dense(sizes: Sequence[int]) -> int:
    """Parameters of a chain of linear layers ``sizes[0] -> sizes[1] -> ...`` with biases."""
    return sum((a + 1) * b for a, b in itertools.pairwise(sizes))


def _logreg_parameters(*, input_shape: tuple[int, ...], num_classes: int) -> int:
    return _dense([math.prod(input_shape), num_classes])


def _mlp_parameters(
    *, input_shape: tuple[int, ...], num_classes: int, hidden: int | Sequence[int] = (200,)
) -> int:
    return _dense([math.prod(input_shape), *_mlp_widths(hidden), num_classes])


def _conv(c_in: int, c_out: int, kernel: int) -> int:
    return c_in * c_out * kernel * kernel + c_out


def _cnn_parameters(*, input_shape: tuple[int, ...], num_classes: int, hidden: int = 128) -> int:
    channels, height, width = _image_shape(input_shape, smallest=4, model="cnn", hidden=hidden)
    flat = 32 * (height // 4) * (width // 4)
    return _conv(channels, 16, 5) + _conv(16, 32, 5) + _dense([flat, hidden, num_classes])


def _cnn32_parameters(*, input_shape: tuple[int, ...], num_classes: int, hidden: int = 128) -> int:
    channels, height, width = _image_shape(input_shape, smallest=8, model="cnn32", hidden=hidden)
    flat = 64 * (height // 8) * (width // 8)
    convs = _conv(channels, 32, 3) + _conv(32, 64, 3) + _conv(64, 64, 3)
    return convs + _dense([flat, hidden, num_classes])


@register_model("logreg", parameters=_logreg_parameters)
def logreg(*, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression (the seed paper's model): flatten, one linear layer."""
    from torch import nn  # noqa: PLC0415

    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


@register_model("mlp", parameters=_mlp_parameters)
def mlp(
    *, input_shape: tuple[int, ...], num_classes: int, hidden: int | Sequence[int] = (200,)
) -> nn.Module:
    """Fully connected ReLU network with ``hidden`` layer widths (an int is one layer)."""
    from torch import nn  # noqa: PLC0415

    widths = _mlp_widths(hidden)
    layers: list[nn.Module] = [nn.Flatten()]
    previous = math.prod(input_shape)
    for width in widths:
        layers += [nn.Linear(previous, width), nn.ReLU()]
        previous = width
    layers.append(nn.Linear(previous, num_classes))
    return nn.Sequential(*layers)


@register_model("cnn", parameters=_cnn_parameters)
def cnn(*, input_shape: tuple[int, ...], num_classes: int, hidden: int = 128) -> nn.Module:
    """Small CNN for 28x28 grey images: two 5x5 conv + 2x2 max-pool blocks (16, 32), one hidden.

    About 215k parameters on 1x28x28; any (C, H, W) with H, W >= 4 works.
    """
    from torch import nn  # noqa: PLC0415

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


@register_model("cnn32", parameters=_cnn32_parameters)
def cnn32(*, input_shape: tuple[int, ...], num_classes: int, hidden: int = 128) -> nn.Module:
    """Small CNN for 32x32 colour images: three 3x3 conv + 2x2 max-pool blocks (32, 64, 64).

    About 190k parameters on 3x32x32; any (C, H, W) with H, W >= 8 works.
    """
    from torch import nn  # noqa: PLC0415

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
