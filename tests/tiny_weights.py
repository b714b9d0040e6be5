"""Test scaffolding: tiny random weights in each author's checkpoint format.

The modules are the real classes (open_clip.CLIP, Combiner, IM2TEXT, Phi) at toy sizes, saved
exactly as the authors save theirs, so ``from_weights`` reads them through the real path.
Numbers computed with them are *not* the baselines' numbers: every adapter built from them
carries a note saying its architecture is not the authors'.

    python -m tests.tiny_weights DIR     # from the checkout: writes the tiny weights under DIR
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from cir_bench_baselines.clip4cir import Combiner
from cir_bench_baselines.pic2word import IM2TEXT
from cir_bench_baselines.searle import Phi

TEXT = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 1}


def tiny_clip(kind: str = "vit", seed: int = 0, embed_dim: int = 32):
    """A 1-layer open_clip.CLIP (ViT 32 px or ModifiedResNet 64 px), QuickGELU, float32."""
    import open_clip

    torch.manual_seed(seed)
    if kind == "vit":
        vision = open_clip.CLIPVisionCfg(layers=1, width=64, patch_size=16, image_size=32)
    else:
        vision = open_clip.CLIPVisionCfg(layers=(1, 1, 1, 1), width=8, image_size=64)
    model = open_clip.CLIP(embed_dim, vision_cfg=vision, text_cfg=open_clip.CLIPTextCfg(**TEXT), quick_gelu=True)
    with torch.no_grad():  # open_clip zero-initialises some projections; make every output depend on its input
        for p in model.parameters():
            if p.dim() > 1 and float(p.abs().sum()) == 0.0:
                p.normal_(0, 0.02)
    return model.eval()


def _save(obj, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def write_tiny_weights(root: str | Path, seed: int = 0) -> dict[str, list[Path]]:
    """Write every adapter's files under ``root`` in the authors' formats; returns the paths."""
    root = Path(root)
    written: dict[str, list[Path]] = {}
    # CLIP4CIR: {'epoch', 'CLIP': OpenAI-format state dict} + {'epoch', 'Combiner': state dict}
    rn = tiny_clip("rn", seed)
    torch.manual_seed(seed + 1)
    comb = Combiner(32, 16, 32)
    written["clip4cir"] = [
        _save({"epoch": 3, "CLIP": rn.state_dict()}, root / "clip4cir" / "cirr_clip_RN50x4_fullft.pt"),
        _save({"epoch": 3, "Combiner": comb.state_dict()}, root / "clip4cir" / "cirr_comb_RN50x4_fullft.pt")]
    # Pic2Word: {'epoch', 'state_dict': CLIP with 'module.', 'state_dict_img2text', 'optimizer'}
    vit_l = tiny_clip("vit", seed + 2)
    torch.manual_seed(seed + 3)
    img2text = IM2TEXT(embed_dim=32, middle_dim=16, output_dim=TEXT["width"])
    optim = torch.optim.AdamW(img2text.parameters(), lr=1e-4)
    img2text(torch.randn(2, 32)).sum().backward()
    optim.step()
    written["pic2word"] = [_save({
        "epoch": 1, "name": "pic2word",
        "state_dict": {f"module.{k}": v for k, v in vit_l.state_dict().items()},
        "state_dict_img2text": {f"module.{k}": v for k, v in img2text.state_dict().items()},
        "optimizer": optim.state_dict()}, root / "pic2word" / "pic2word_model.pt")]
    # SEARLE / SEARLE-XL: {'Phi': state dict}; the OpenAI CLIP backbones beside them
    vit_b = tiny_clip("vit", seed + 4)
    torch.manual_seed(seed + 5)
    phi_b, phi_l = Phi(32, 128, TEXT["width"]), Phi(32, 128, TEXT["width"])
    written["clip"] = [_save(vit_b.state_dict(), root / "clip" / "ViT-B-32.pt"),
                       _save(vit_l.state_dict(), root / "clip" / "ViT-L-14.pt")]
    written["searle"] = [_save({"Phi": phi_b.state_dict()}, root / "searle" / "SEARLE_ViT-B32.pt"),
                         _save({"Phi": phi_l.state_dict()}, root / "searle" / "SEARLE_ViT-L14.pt")]
    written["covr"] = write_tiny_covr(root, seed + 6)
    written["freedom"] = [write_tiny_corpus(root / "freedom" / "open_image_v7_class_names.csv")]
    written["searle-oti"] = write_tiny_oti_files(root / "searle")
    written["lincir"] = write_tiny_lincir(root / "lincir", seed + 7)
    written["basic"] = write_tiny_basic(root / "basic", 32, seed + 8)
    return written


# FreeDom's corpus: the authors' file is one class name per row (the first column)
CORPUS_WORDS = ["'Nduja", "10 cane", "Accordion", "Airplane", "Apple", "Bicycle", "Bird", "Boat", "Book", "Bottle",
                "Bridge", "Butterfly", "Cake", "Car", "Castle", "Cat", "Chair", "Clock", "Dog", "Drum", "Flower",
                "Guitar", "Hat", "Horse", "House", "Lamp", "Mountain", "Mushroom", "Piano", "Tree"]


def write_tiny_corpus(path: Path, words: list[str] = CORPUS_WORDS) -> Path:
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([w] for w in words)
    return path


VOCAB = ["[PAD]"] + [f"[unused{i}]" for i in range(3)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + \
    "a an and is in it to of make change style photo that".split() + \
    "flat outline hatched dotted gradient mosaic circle square triangle star hexagon cross ring diamond".split() + \
    "red orange yellow green cyan blue purple pink".split()


class _FakeScheduler:
    """Stands in for CoVR's ``src.tools.scheduler.CosineSchedule`` when writing a checkpoint."""

    def __init__(self) -> None:
        self.base_lr, self.step = 1e-4, 7


def write_tiny_covr(root: Path, seed: int = 0) -> list[Path]:
    """A tiny BLIP retrieval model saved as CoVR's Fabric checkpoint: BLIP key names, the learnt
    temperature, a position_ids buffer, optimizer state and a pickled object of the authors'
    scheduler class (module ``src.tools.scheduler``, which does not exist when loading)."""
    import types

    from transformers import BlipConfig, BlipForImageTextRetrieval

    from cir_bench_baselines.covr import hf_to_blip

    vocab = root / "covr" / "bert-base-uncased" / "vocab.txt"
    vocab.parent.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    torch.manual_seed(seed)
    config = BlipConfig(
        vision_config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=1, intermediate_size=128,
                           image_size=32, patch_size=16, layer_norm_eps=1e-6),
        text_config=dict(vocab_size=len(VOCAB) + 2, hidden_size=64, num_hidden_layers=1, num_attention_heads=1,
                         intermediate_size=128, max_position_embeddings=64, encoder_hidden_size=64,
                         bos_token_id=len(VOCAB), pad_token_id=0, sep_token_id=VOCAB.index("[SEP]")),
        image_text_hidden_size=32)
    model = BlipForImageTextRetrieval(config).eval()
    with torch.no_grad():  # HF initialises BLIP's vision tower with std 1e-10: the image would not matter
        for name, p in model.vision_model.named_parameters():
            if p.dim() > 1 or "embedding" in name:
                p.normal_(0, 0.05)
    state = {hf_to_blip(k): v for k, v in model.state_dict().items() if not k.startswith("itm_head.")}
    state["temp"] = torch.tensor(0.07)
    state["text_encoder.embeddings.position_ids"] = torch.arange(64)[None]
    names = ("src", "src.tools", "src.tools.scheduler")
    saved = {n: sys.modules.get(n) for n in names}
    mods = {n: types.ModuleType(n) for n in names}
    mods["src.tools.scheduler"].CosineSchedule = _FakeScheduler
    _FakeScheduler.__module__, _FakeScheduler.__qualname__ = "src.tools.scheduler", "CosineSchedule"
    sys.modules.update(mods)
    try:
        path = _save({"epoch": 4, "model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5}]},
                      "scheduler": _FakeScheduler()}, root / "covr" / "webvid-covr.ckpt")
    finally:
        _FakeScheduler.__module__, _FakeScheduler.__qualname__ = __name__, "_FakeScheduler"
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    return [path, vocab]


def tiny_phrases(words: list[str] = CORPUS_WORDS) -> dict[str, list[str]]:
    """GPT-Neo's phrases stand-in: three phrases a concept, each holding it; "Hat" also has one
    without it, so the authors' filter drops that concept."""
    out = {w: [f"a {w} on the table", f"my {w} and its colour", f"the old {w} in the sun"] for w in words}
    out["Hat"].append("something else entirely")
    return out


def write_tiny_oti_files(folder: Path, words: list[str] = CORPUS_WORDS) -> list[Path]:
    """SEARLE-OTI's files in the authors' formats: concept_to_phrases.pkl (a pickled dict) and
    oidv7-class-descriptions.csv (LabelName, DisplayName)."""
    import csv
    import pickle

    phrases = folder / "GPTNeo27B" / "concept_to_phrases.pkl"
    phrases.parent.mkdir(parents=True, exist_ok=True)
    with open(phrases, "wb") as f:
        pickle.dump(tiny_phrases(words), f)
    concepts = folder / "oidv7-class-descriptions.csv"
    with open(concepts, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["LabelName", "DisplayName"])
        writer.writerows([f"/m/{i:05d}", w] for i, w in enumerate(words))
    return [phrases, concepts]


def tiny_hf_clip(seed: int = 0):
    """A 1-layer Hugging Face CLIPModel (224 px, patch 32, QuickGELU), the layout of
    openai/clip-vit-large-patch14 at toy widths."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    layer = {"intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2, "hidden_act": "quick_gelu"}
    cfg = CLIPConfig(text_config={"vocab_size": 49408, "hidden_size": 64, "max_position_embeddings": 77,
                                  "eos_token_id": 2, "projection_dim": 32, **layer},
                     vision_config={"hidden_size": 48, "image_size": 224, "patch_size": 32, "projection_dim": 32,
                                    **layer}, projection_dim=32)
    return CLIPModel(cfg).eval()


def write_tiny_lincir(folder: Path, seed: int = 0) -> list[Path]:
    """LinCIR's files: {'Phi': state dict} and the HF CLIP folder (config.json, model.safetensors)."""
    clip = tiny_hf_clip(seed)
    clip.save_pretrained(folder / "clip-vit-large-patch14")
    torch.manual_seed(seed + 1)
    phi = Phi(32, 128, 64)
    return [_save({"Phi": phi.state_dict()}, folder / "lincir_large.pt"),
            folder / "clip-vit-large-patch14" / "config.json", folder / "clip-vit-large-patch14" / "model.safetensors"]


# more rows than the tiny CLIP's 32 dimensions: the contrastive PCA then has no null space, whose
# eigenvalues' signs (BASIC keeps the positive ones) would be rounding noise
SUBJECTS = ["object_name"] + """Abacus Apple Bicycle Boat Cat Chair Dog Guitar Horse House Lamp Mountain Piano Tree Car Clock
    Bird Bridge Butterfly Cake Castle Drum Flower Hat Mushroom Book Bottle Airplane Accordion Kettle Ladder Lemon Owl
    Pear Rabbit Robot Shoe Spoon Tiger Train Umbrella Violin Whale Zebra""".split()
STYLES = ["watercolor painting", "oil painting", "charcoal sketch", "pencil drawing", "cartoon", "pixel art",
          "mosaic", "origami", "toy", "sculpture", "tattoo", "embroidery", "graffiti", "stained glass", "woodcut",
          "ink wash", "pastel drawing", "comic book", "low poly render", "claymation", "papercut", "neon sign",
          "blueprint", "chalk drawing", "vector art", "pop art", "cubist painting", "impressionist painting",
          "ukiyo-e print", "line art", "isometric illustration", "vintage photo", "infrared photo", "x-ray image",
          "thermal image", "lego model", "knitted toy", "marble statue", "bronze statue", "sand sculpture"]


def write_tiny_basic(folder: Path, dim: int, seed: int = 0) -> list[Path]:
    """BASIC's files in the authors' formats: the two corpora (csv, subjects with its header row),
    the LAION mean (a pickled dict holding a torch tensor) and the synthetic set (np.save of a dict)."""
    import csv
    import pickle

    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in (("generic_subjects.csv", SUBJECTS), ("generic_styles.csv", STYLES)):
        with open(folder / name, "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([r] for r in rows)
        paths.append(folder / name)
    torch.manual_seed(seed)
    with open(folder / "laion_1m_mean_clip.pkl", "wb") as f:
        pickle.dump({"laion_1m_mean": torch.randn(1, dim) * 0.05}, f)
    rng = np.random.default_rng(seed)
    np.save(folder / "dataset_1_sd_clip.pkl.npy", {"image_features": rng.standard_normal((20, dim)).astype("float32"),
                                                   "text_features": rng.standard_normal((20, dim)).astype("float32")},
            allow_pickle=True)
    return [*paths, folder / "laion_1m_mean_clip.pkl", folder / "dataset_1_sd_clip.pkl.npy"]


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-weights")
    for name, paths in write_tiny_weights(target).items():
        print(name, *[str(p) for p in paths])
