from __future__ import annotations

import pytest
import torch

from cir_bench.config import ModelConfig
from cir_bench.models import (BACKBONES, MissingWeightsError, build_backbone, build_model, load_checkpoint,
                              save_checkpoint)
from cir_bench.registry import UnknownNameError


def test_backbone_registry_and_unknown_name():
    assert {"small_cnn", "vgg16_bn", "resnet50", "vit_b_16", "convnext_base"} <= set(BACKBONES.names())
    with pytest.raises(UnknownNameError, match="unknown backbone 'resnet9000'; available: .*resnet50"):
        build_backbone("resnet9000", pretrained=False)


@pytest.mark.parametrize("name", ["resnet50", "convnext_base"])
def test_torchvision_backbones_give_the_declared_feature_dim(name):
    module, spec = build_backbone(name, pretrained=False)
    with torch.no_grad():
        out = module.eval()(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, spec.feat_dim)


def test_missing_pretrained_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CIR_BENCH_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(MissingWeightsError) as err:
        build_backbone("resnet50", pretrained=True)
    msg = str(err.value)
    assert "resnet50-0676ba61.pth" in msg and str(tmp_path / "resnet50-0676ba61.pth") in msg
    assert "download.pytorch.org" in msg and "never downloads" in msg
    with pytest.raises(MissingWeightsError, match="does not exist"):
        build_backbone("resnet50", pretrained=True, weights=str(tmp_path / "nope.pth"))


def test_local_pretrained_weights_are_found_and_loaded(tmp_path, monkeypatch):
    # a torchvision-format state dict (classifier keys included) in the weights folder
    import torchvision

    ref = torchvision.models.resnet50(weights=None)
    torch.save(ref.state_dict(), tmp_path / "resnet50-0676ba61.pth")
    monkeypatch.setenv("CIR_BENCH_WEIGHTS", str(tmp_path))
    module, _ = build_backbone("resnet50", pretrained=True)
    assert torch.equal(module.conv1.weight, ref.conv1.weight)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "resnet50-0676ba61.pth").write_bytes(b"truncated")
    monkeypatch.setenv("CIR_BENCH_WEIGHTS", str(tmp_path / "bad"))
    with pytest.raises(MissingWeightsError, match="truncated"):
        build_backbone("resnet50", pretrained=True)


def test_checkpoint_roundtrip_weights_only(tmp_path):
    cfg = ModelConfig(embed_dim=64)
    model = build_model(cfg, {"style": 6, "shape": 8}).eval()
    path = save_checkpoint(tmp_path / "m.pt", model, cfg, {"style": list("abcdef"), "shape": list("abcdefgh")},
                           {"note": "x"})
    payload = torch.load(path, weights_only=True)  # plain data, no pickled code
    assert payload["model_config"]["embed_dim"] == 64
    loaded, meta = load_checkpoint(path)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        z1, l1 = model(x)
        z2, l2 = loaded(x)
    assert torch.allclose(z1, z2) and all(torch.allclose(l1[k], l2[k]) for k in l1)
    assert meta["extra"]["note"] == "x" and z1.shape == (3, 64)
    assert float(z1.abs().max()) < 1.0  # tanh embedding


def test_frozen_backbone_gets_no_gradient():
    model = build_model(ModelConfig(finetune=False, embed_dim=64), {"style": 6})
    model.train()
    assert not model.backbone.training  # BN statistics of a frozen backbone stay as loaded
    z, logits = model(torch.randn(4, 3, 64, 64))
    logits["style"].sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.reduction[0].weight.grad is not None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_model_runs_on_cuda():
    from cir_bench.models import pick_device

    dev = pick_device("auto")
    model = build_model(ModelConfig(embed_dim=64), {"style": 6}).to(dev).eval()
    z, logits = model(torch.randn(2, 3, 64, 64, device=dev))
    assert z.device.type == "cuda" and logits["style"].device.type == "cuda"


def test_packaged_efficientnet_lite0_beats_random_init_on_synthart(tiny):
    from cir_bench.data.synthart import CONTEXT_FACTORS
    from cir_bench.train.probe import backbone_features, linear_probe

    frame = tiny.to_frame()
    targets = {f: frame[f"factor_{f}"] for f in ("style", "shape")}
    pre = linear_probe(backbone_features("efficientnet_lite0", True, tiny, 96), targets, frame["group"])
    rnd = linear_probe(backbone_features("efficientnet_lite0", False, tiny, 96), targets, frame["group"])
    assert pre["style"] > rnd["style"] + 0.2, (pre, rnd)
    assert set(CONTEXT_FACTORS) >= set(targets)


def test_frozen_backbone_training_uses_cached_features(tiny):
    from cir_bench.config import ModelConfig, TrainConfig
    from cir_bench.train import train_model

    cfg = ModelConfig(finetune=False, embed_dim=32, input_size=32)
    model, history = train_model(tiny, cfg, TrainConfig(epochs=2, batch_size=32), torch.device("cpu"), seed=0,
                                 progress=False)
    torch.manual_seed(0)  # train_model seeds with 0 before building: the same initial weights
    fresh = build_model(cfg, {p.name: p.num_classes for p in tiny.properties})
    assert all(torch.equal(a, b) for a, b in zip(model.backbone.state_dict().values(),
                                                 fresh.backbone.state_dict().values()))
    assert len(history.epochs) == 2 and "val_acc_style" in history.final
