"""Loading local weights: safetensors, weights_only torch files, clear refusals."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core.errors import WeightsError
from core.weights import load_weights


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))


def test_safetensors_and_pt_round_trip(tmp_path):
    src = make_model()
    save_file(src.state_dict(), tmp_path / "w.safetensors")
    torch.save({"model": src.state_dict()}, tmp_path / "w.pt")
    for name in ("w.safetensors", "w.pt"):
        dst = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3))
        load_weights(dst, str(tmp_path / name))
        for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True):
            assert torch.equal(a, b)


class Payload:
    def __reduce__(self):
        return (print, ("this would run on load",))


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match=r"evil\.pt: cannot be read with torch\.load\(weights_only=True\)"):
        load_weights(make_model(), str(tmp_path / "evil.pt"))


def test_new_head_needs_exclude_and_errors_name_the_keys(tmp_path):
    src = make_model()
    state = src.state_dict()
    state["2.weight"] = torch.zeros(5, 8)  # a 5-class head
    state["2.bias"] = torch.zeros(5)
    save_file(state, tmp_path / "w.safetensors")
    with pytest.raises(
        WeightsError,
        match=r"w\.safetensors does not fit the model.*2\.weight: file \(5, 8\) vs model \(3, 8\).*weights_exclude",
    ):
        load_weights(make_model(), str(tmp_path / "w.safetensors"))
    dst = make_model()
    head_before = dst[2].weight.clone()
    load_weights(dst, str(tmp_path / "w.safetensors"), exclude=["2.*"])
    assert torch.equal(dst[0].weight, src[0].weight) and torch.equal(dst[2].weight, head_before)


class TiedHead(torch.nn.Module):
    """A head sharing its layer with the body, as D-FINE's heads share their decoder's."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)])
        self.head = self.body[1]


def test_tied_weights_load_from_an_export_that_keeps_one_name(tmp_path):
    """accelerate's save_model (as transformers') writes a tied tensor under one of its names; the
    other names are filled through it, and a file lacking every name of a tensor is still refused."""
    from accelerate import Accelerator

    torch.manual_seed(0)
    src = TiedHead()
    Accelerator(cpu=True).save_model(src, str(tmp_path), safe_serialization=True)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        written = set(f.keys())
    assert len(written) == 4 and len(src.state_dict()) == 6  # head.* or body.1.*, not both
    torch.manual_seed(1)
    dst = TiedHead()
    load_weights(dst, str(tmp_path / "model.safetensors"))
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in src.state_dict().items())
    assert dst.head is dst.body[1]
    partial = {k: v for k, v in src.state_dict().items() if not k.endswith("1.weight")}  # neither name
    save_file({k: v.clone() for k, v in partial.items() if k.startswith("body")}, tmp_path / "partial.safetensors")
    with pytest.raises(WeightsError, match=r"missing from the file: body\.1\.weight, head\.weight"):
        load_weights(TiedHead(), str(tmp_path / "partial.safetensors"))


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found"):
        load_weights(make_model(), str(tmp_path / "nope.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match=r"bad\.safetensors: not a readable safetensors file"):
        load_weights(make_model(), str(tmp_path / "bad.safetensors"))


def test_a_batchnorm_checkpoint_starts_a_detector_with_frozen_batchnorm(tmp_path):
    """An ImageNet ResNet file (BatchNorm, with num_batches_tracked) into the frozen-BN backbone of a
    detector, no exclusion: FrozenBatchNorm2d drops num_batches_tracked on its own load, so must we;
    every weight and statistic lands, and an entry no module drops is still refused."""
    import torchvision

    from recipes.detection.models import DetectionModelConfig, build_model

    torch.manual_seed(0)
    resnet = torchvision.models.resnet50()
    for m in resnet.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    file = {f"backbone.body.{k}": v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    assert any(k.endswith("num_batches_tracked") for k in file)
    save_file(file, tmp_path / "resnet50.safetensors")

    detector = build_model(DetectionModelConfig(name="fasterrcnn_resnet50_fpn", num_classes=3, frozen_bn=True), 64, 64)
    backbone_keys = [k for k in detector.state_dict() if k.startswith("backbone.body.")]
    load_weights(detector, str(tmp_path / "resnet50.safetensors"), exclude=["backbone.fpn.*", "rpn.*", "roi_heads.*"])
    loaded = detector.state_dict()
    for k in backbone_keys:
        torch.testing.assert_close(loaded[k], file[k], rtol=0, atol=0, msg=k)

    file["backbone.body.layer1.0.bn1.not_a_buffer"] = torch.zeros(1)
    save_file(file, tmp_path / "extra.safetensors")
    with pytest.raises(WeightsError, match=r"not in the model: backbone\.body\.layer1\.0\.bn1\.not_a_buffer"):
        load_weights(detector, str(tmp_path / "extra.safetensors"), exclude=["backbone.fpn.*", "rpn.*", "roi_heads.*"])


def test_a_model_built_on_the_meta_device_gets_storage_and_a_fresh_head_for_sharding(tmp_path):
    """FSDP2's half of a sharded start before accelerate's prepare (the rest, streaming the file
    into the shards, runs on 2 ranks in tests/integration/test_sharded_start.py): parameters the
    file fills get storage to be sharded, an excluded module starts fresh from its own
    reset_parameters and the seed, buffers stay as the model built them, and a file that does not
    fit is refused before anything is allocated."""
    from accelerate import init_empty_weights

    from core.weights import allocate_for_sharded_load

    weights = str(tmp_path / "w.safetensors")
    save_file(make_model().state_dict(), weights)

    def built_empty(*extra: Callable[[], torch.nn.Module]) -> torch.nn.Sequential:
        with init_empty_weights(include_buffers=False):
            layers = [torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)]
            return torch.nn.Sequential(*layers, *(build() for build in extra))

    model = built_empty()
    assert all(p.is_meta for p in model.parameters())
    torch.manual_seed(1)
    allocate_for_sharded_load(model, weights, exclude=["2.*"])
    assert not any(p.is_meta for p in model.parameters())
    torch.manual_seed(1)
    assert torch.equal(model[2].weight, torch.nn.Linear(8, 3).weight)  # the head's own init, from the seed

    norm = built_empty(lambda: torch.nn.BatchNorm1d(3))
    assert torch.equal(norm[3].running_var, torch.ones(3))  # built real
    with pytest.raises(WeightsError, match=r"does not fit the model \(missing from the file: 3\.weight, 3\.bias"):
        allocate_for_sharded_load(norm, weights)
    assert all(p.is_meta for p in norm.parameters())  # refused before anything was allocated

    class NoReset(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(3))

    with pytest.raises(WeightsError, match=r"3\.scale: not taken from .* \(NoReset\) has no reset_parameters"):
        allocate_for_sharded_load(built_empty(NoReset), weights, exclude=["3.*"])
