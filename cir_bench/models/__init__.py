"""Models: backbone registry, encoder + heads, checkpoints, the student network, the device."""
from cir_bench.models.backbones import BACKBONES, BackboneSpec, MissingWeightsError, build_backbone
from cir_bench.models.checkpoint import build_model, load_checkpoint, save_checkpoint
from cir_bench.models.device import pick_device
from cir_bench.models.model import ClassifierHead, ConditionalRetrievalModel

__all__ = [
    "BACKBONES", "BackboneSpec", "MissingWeightsError", "build_backbone", "build_model",
    "load_checkpoint", "save_checkpoint", "ClassifierHead", "ConditionalRetrievalModel", "pick_device",
]
