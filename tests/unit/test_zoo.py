"""Model zoo: every model trains on 28 x 28 grey and RGB; BatchNorm names; weight arrays."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import nn

from services.common.models import (
    UnknownModel,
    WeightsMismatch,
    available_models,
    batchnorm_prefixes,
    build_model,
    default_input,
    load_state_arrays,
    parameter_count,
    state_arrays,
    state_entries,
)

MODELS = ("cnn-small", "cnn-small-gn", "mobilenet_v2", "mobilenet_v3_small", "resnet18")
BATCHNORM_MODELS = tuple(m for m in MODELS if m != "cnn-small-gn")


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core box, 2 OpenMP threads spin and run 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_zoo_offers_the_documented_models() -> None:
    assert set(available_models()) == set(MODELS)


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("name", MODELS)
def test_model_runs_forward_and_backward_on_28_pixel_images(name: str, in_channels: int) -> None:
    # Given a 3-class model for 28 x 28 images
    model = build_model(name, num_classes=3, in_channels=in_channels, image_size=28, seed=0)
    images = torch.randn(2, in_channels, 28, 28)

    # When a batch of two goes forward and backward
    logits = model(images)
    logits.sum().backward()

    # Then there is one logit per class and every parameter received a finite gradient
    assert logits.shape == (2, 3)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert any(bool(g.abs().sum() > 0) for g in grads if g is not None)


@pytest.mark.parametrize("name", BATCHNORM_MODELS)
def test_batchnorm_prefixes_name_every_batchnorm_module_and_nothing_else(name: str) -> None:
    model = build_model(name, num_classes=2, in_channels=1, image_size=28, seed=0)
    modules = dict(model.named_modules())

    prefixes = batchnorm_prefixes(model)

    assert prefixes
    assert all(isinstance(modules[p], nn.BatchNorm2d) for p in prefixes)
    bn_count = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(prefixes) == bn_count


def test_small_images_get_a_stride_one_resnet_stem_without_maxpool() -> None:
    small = build_model("resnet18", num_classes=2, in_channels=1, image_size=28, seed=0)
    large = build_model("resnet18", num_classes=2, in_channels=1, image_size=128, seed=0)

    assert isinstance(small.conv1, nn.Conv2d) and small.conv1.stride == (1, 1)
    assert isinstance(small.maxpool, nn.Identity)
    assert isinstance(large.conv1, nn.Conv2d) and large.conv1.stride == (2, 2)
    assert isinstance(large.maxpool, nn.MaxPool2d)


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v3_small", "resnet18"])
def test_small_image_models_keep_a_four_by_four_feature_map_at_28_pixels(name: str) -> None:
    model = build_model(name, num_classes=2, in_channels=1, image_size=28, seed=0)
    children = dict(model.named_children())
    backbone = children.get("features") or nn.Sequential(*list(children.values())[:-2])

    features = backbone(default_input(in_channels=1, image_size=28))

    assert tuple(features.shape[-2:]) == (4, 4)


def test_cnn_small_has_about_four_hundred_thousand_parameters() -> None:
    model = build_model("cnn-small", num_classes=2, in_channels=1, image_size=28, seed=0)

    assert 350_000 <= parameter_count(model) <= 450_000


def test_the_same_seed_builds_identical_weights_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)

    a = build_model("cnn-small", num_classes=2, in_channels=1, image_size=28, seed=5)
    b = build_model("cnn-small", num_classes=2, in_channels=1, image_size=28, seed=5)
    c = build_model("cnn-small", num_classes=2, in_channels=1, image_size=28, seed=6)

    assert torch.equal(torch.rand(1), expected_next)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["features.0.weight"], sc["features.0.weight"])


def test_an_unknown_model_name_lists_the_available_ones() -> None:
    with pytest.raises(UnknownModel, match="cnn-small"):
        build_model("vgg16", num_classes=2, in_channels=1, image_size=28)


@pytest.mark.parametrize("name", ["cnn-small", "resnet18"])
def test_weights_round_trip_through_numpy_arrays(name: str) -> None:
    # Given a model whose BatchNorm statistics have moved, and a differently seeded twin
    source = build_model(name, num_classes=2, in_channels=1, image_size=28, seed=1)
    source.train()
    source(torch.randn(4, 1, 28, 28))
    target = build_model(name, num_classes=2, in_channels=1, image_size=28, seed=2)

    # When the source's arrays are loaded into the twin
    arrays = state_arrays(source, copy=True)
    load_state_arrays(target, arrays)

    # Then every entry, buffers included, is equal and both models compute the same output
    src, dst = source.state_dict(), target.state_dict()
    assert list(arrays) == list(src)
    assert all(torch.equal(src[k], dst[k]) for k in src)
    x = torch.randn(2, 1, 28, 28)
    source.eval()
    target.eval()
    assert torch.equal(source(x), target(x))


def test_state_arrays_are_float32_and_int64_in_state_dict_order_like_state_entries() -> None:
    model = build_model("cnn-small", num_classes=2, in_channels=1, image_size=28, seed=0)

    arrays = state_arrays(model)
    entries = state_entries(model)

    assert [(n, a.dtype.name, a.shape) for n, a in arrays.items()] == entries
    assert {a.dtype for a in arrays.values()} == {np.dtype(np.float32), np.dtype(np.int64)}
    assert arrays["features.1.num_batches_tracked"].dtype == np.int64


def test_state_arrays_share_memory_with_the_model_unless_copied() -> None:
    model = build_model("cnn-small", num_classes=2, in_channels=1, image_size=28, seed=0)
    shared = state_arrays(model)
    snapshot = state_arrays(model, copy=True)
    before = np.asarray(snapshot["features.0.weight"], dtype=np.float32).copy()

    with torch.no_grad():
        model.get_parameter("features.0.weight").add_(1.0)

    assert np.array_equal(shared["features.0.weight"], before + 1.0)
    assert np.array_equal(snapshot["features.0.weight"], before)


def test_loading_arrays_with_a_missing_or_misshaped_entry_is_rejected_by_name() -> None:
    model = build_model("cnn-small", num_classes=2, in_channels=1, image_size=28, seed=0)
    arrays = state_arrays(model, copy=True)
    misshaped = dict(arrays, **{"classifier.4.bias": np.zeros(3, dtype=np.float32)})
    missing = {k: v for k, v in arrays.items() if k != "classifier.4.weight"}

    with pytest.raises(WeightsMismatch, match=r"classifier\.4\.bias"):
        load_state_arrays(model, misshaped)
    with pytest.raises(WeightsMismatch, match=r"missing \['classifier\.4\.weight'\]"):
        load_state_arrays(model, missing)


def test_read_only_big_endian_float64_arrays_load_as_their_values() -> None:
    model = build_model("cnn-small", num_classes=2, in_channels=1, image_size=28, seed=0)
    arrays = {k: v.astype(v.dtype.newbyteorder(">")) for k, v in state_arrays(model).items()}
    arrays["classifier.4.bias"] = np.array([0.25, -0.5], dtype=">f8")
    for array in arrays.values():
        array.flags.writeable = False

    load_state_arrays(model, arrays)

    assert model.state_dict()["classifier.4.bias"].tolist() == [0.25, -0.5]


def test_cnn_small_gn_has_group_norm_and_no_running_statistics() -> None:
    model = build_model("cnn-small-gn", num_classes=2, in_channels=1, image_size=28, seed=0)
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    assert not any(name.endswith("running_mean") for name, _ in model.named_buffers())
    assert batchnorm_prefixes(model) == set()


def test_building_cnn_small_does_not_import_torchvision() -> None:
    code = (
        "import sys\n"
        "from services.common.models import build_model\n"
        "build_model('cnn-small', num_classes=2, in_channels=1, image_size=28)\n"
        "print('torchvision' in sys.modules)\n"
    )
    command = [sys.executable, "-c", code]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
