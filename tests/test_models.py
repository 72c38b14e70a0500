from __future__ import annotations

import pytest
import torch
from torch import nn

from fedtorrent import models
from fedtorrent.errors import ConfigError, UnknownNameError
from fedtorrent.models import build_model, model_names, register_model


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("logreg", (1, 28, 28)),
        ("mlp", (1, 28, 28)),
        ("cnn", (1, 28, 28)),
        ("cnn", (1, 8, 8)),
        ("cnn32", (3, 32, 32)),
        ("logreg", (3, 32, 32)),
    ],
)
def test_registered_models_map_batches_to_logits(name: str, shape: tuple[int, ...]) -> None:
    model = build_model(name, input_shape=shape, num_classes=7)
    assert model(torch.rand(5, *shape)).shape == (5, 7)
    assert list(model.buffers()) == []  # a state is its parameters only


def test_the_four_short_names_are_registered() -> None:
    assert {"logreg", "mlp", "cnn", "cnn32"} <= set(model_names())
    assert list(model_names()) == sorted(model_names())


def test_logreg_is_one_linear_layer() -> None:
    model = build_model("logreg", input_shape=(1, 28, 28), num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == 784 * 10 + 10


def test_unknown_name_lists_the_valid_names() -> None:
    with pytest.raises(UnknownNameError, match="unknown model 'resnet'; choose one of: cnn, cnn32"):
        build_model("resnet", input_shape=(1, 28, 28), num_classes=10)


def test_building_under_the_same_seed_gives_the_same_weights() -> None:
    def weights(seed: int) -> list[torch.Tensor]:
        torch.manual_seed(seed)
        return list(build_model("cnn", input_shape=(1, 28, 28), num_classes=10).parameters())

    first, second, other = weights(3), weights(3), weights(4)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_mlp_hidden_sizes() -> None:
    model = build_model("mlp", input_shape=(4,), num_classes=3, hidden=[8, 6])
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(4, 8), (8, 6), (6, 3)]
    single = build_model("mlp", input_shape=(4,), num_classes=3, hidden=5)
    assert single(torch.rand(2, 4)).shape == (2, 3)


@pytest.mark.parametrize(
    ("name", "shape", "kwargs"),
    [
        ("cnn", (784,), {}),
        ("cnn", (1, 2, 28), {}),
        ("cnn32", (3, 4, 4), {}),
        ("cnn", (1, 28, 28), {"hidden": 0}),
        ("mlp", (4,), {"hidden": [8, -1]}),
        ("logreg", (1, 28, 28), {"dropout": 0.5}),
        ("logreg", (0, 28, 28), {}),
    ],
)
def test_bad_shapes_and_arguments_are_config_errors(
    name: str, shape: tuple[int, ...], kwargs: dict[str, object]
) -> None:
    with pytest.raises(ConfigError):
        build_model(name, input_shape=shape, num_classes=10, **kwargs)


def test_any_module_factory_is_accepted() -> None:
    def full(*, input_shape: tuple[int, ...], num_classes: int, width: int) -> nn.Module:
        return nn.Sequential(
            nn.Flatten(), nn.Linear(input_shape[0], width), nn.Linear(width, num_classes)
        )

    model = build_model(full, input_shape=(6,), num_classes=2, width=3)
    assert model(torch.rand(4, 6)).shape == (4, 2)
    bare = build_model(lambda: nn.Linear(6, 2), input_shape=(6,), num_classes=2)
    assert isinstance(bare, nn.Linear)


def test_factories_that_do_not_fit_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"not a torch\.nn\.Module"):
        build_model(lambda: "not a model", input_shape=(6,), num_classes=2)
    with pytest.raises(ConfigError, match="does not accept"):
        build_model(lambda: nn.Linear(6, 2), input_shape=(6,), num_classes=2, width=3)
    with pytest.raises(ConfigError, match="name or a callable"):
        build_model(42, input_shape=(6,), num_classes=2)  # type: ignore[arg-type]


def test_register_model_adds_a_name_and_refuses_duplicates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))

    @register_model("tiny")
    def tiny(*, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return nn.Linear(input_shape[-1], num_classes)

    assert "tiny" in model_names()
    assert isinstance(build_model("tiny", input_shape=(3,), num_classes=2), nn.Linear)
    with pytest.raises(ConfigError, match="already registered"):
        register_model("logreg")(tiny)


@pytest.mark.parametrize(
    ("name", "shape", "kwargs"),
    [
        ("logreg", (1, 28, 28), {}),
        ("logreg", (3, 5, 7), {}),
        ("mlp", (1, 8, 8), {}),
        ("mlp", (1, 28, 28), {"hidden": 17}),
        ("mlp", (2, 3, 4), {"hidden": [5, 9, 2]}),
        ("mlp", (1, 8, 8), {"hidden": []}),
        ("cnn", (1, 28, 28), {}),
        ("cnn", (3, 9, 13), {"hidden": 7}),
        ("cnn32", (3, 32, 32), {}),
        ("cnn32", (1, 17, 8), {"hidden": 3}),
    ],
)
def test_each_size_formula_equals_the_built_models_state(
    name: str, shape: tuple[int, ...], kwargs: dict[str, object]
) -> None:
    from fedtorrent.models import state_bytes

    net = build_model(name, input_shape=shape, num_classes=6, **kwargs)
    real = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    assert state_bytes(name, input_shape=shape, num_classes=6, **kwargs) == real


def test_a_huge_model_is_refused_before_it_is_allocated() -> None:
    import resource

    from fedtorrent.errors import ConfigError

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for kwargs in ({"hidden": [3_300_000]}, {"hidden": 10**12}, {"hidden": [1] * 65}):
        with pytest.raises(ConfigError):
            build_model("mlp", input_shape=(1, 28, 28), num_classes=10, **kwargs)
    with pytest.raises(ConfigError, match="more than the 1000 allowed"):
        build_model("logreg", input_shape=(1, 28, 28), num_classes=10, max_state_bytes=1000)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024  # KiB


def test_a_registered_name_without_a_formula_is_measured_on_the_meta_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torch import nn

    from fedtorrent import models
    from fedtorrent.errors import ConfigError

    monkeypatch.setattr(models, "_REGISTRY", dict(models._REGISTRY))
    register_model("wide")(lambda *, input_shape, num_classes: nn.Linear(10**6, 10**4))
    with pytest.raises(ConfigError, match="40000040000 bytes"):
        build_model("wide", input_shape=(1,), num_classes=2)
