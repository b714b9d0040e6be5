"""LinCIR on a tiny Hugging Face CLIP: the query against a plain re-implementation of the
authors' encode_with_pseudo_tokens_HF and validate.py path; its files named when missing or
damaged."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("transformers")
pytest.importorskip("open_clip")

from cir_bench_baselines import get_composer  # noqa: E402
from cir_bench_baselines.base import BadWeightsError, MissingWeightsError  # noqa: E402


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(11)
    return [Image.fromarray((rng.random((60 + 9 * i, 80, 3)) * 255).astype("uint8")) for i in range(4)]


@pytest.fixture(scope="module")
def lincir(tiny_weights):
    return get_composer("lincir", tiny_weights)


def authors_text_features(clip, ids: torch.Tensor, pseudo: torch.Tensor) -> torch.Tensor:
    """encode_with_pseudo_tokens_HF written out on the model's weights: every "$" (id 259) takes
    its row's pseudo-token, position embeddings, causal pre-LN transformer layers (QuickGELU),
    final LayerNorm, the state at the highest token id (end of text), the text projection."""
    tm = clip.text_model
    x = tm.embeddings.token_embedding(ids)
    x = torch.where((ids == 259)[..., None], pseudo[:, None, :], x)
    x = x + tm.embeddings.position_embedding.weight[: ids.shape[1]]
    n, length, width = x.shape
    causal = torch.full((length, length), float("-inf")).triu(1)
    for layer in tm.encoder.layers:
        attn, h = layer.self_attn, layer.layer_norm1(x)
        heads = attn.num_heads
        q, k, v = (p(h).view(n, length, heads, width // heads).transpose(1, 2)
                   for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        weights = ((q @ k.transpose(-1, -2)) / (width // heads) ** 0.5 + causal).softmax(dim=-1)
        x = x + attn.out_proj((weights @ v).transpose(1, 2).reshape(n, length, width))
        h = layer.mlp.fc1(layer.layer_norm2(x))
        x = x + layer.mlp.fc2(h * torch.sigmoid(1.702 * h))
    x = tm.final_layer_norm(x)
    return clip.text_projection(x[torch.arange(n), ids.argmax(dim=-1)])


def test_query_and_gallery_equal_the_authors_arithmetic(lincir, images):
    import open_clip

    prompts = lincir.prompts(["is in flat style", "make it red", "is a circle $ again", "is blue"])
    assert prompts[0] == "a photo of $ that is in flat style"
    got = lincir.encode_query(images, prompts, wrapped=True)
    with torch.no_grad():
        pixels = lincir.preprocess(images)
        image_embeds = lincir.clip.get_image_features(pixel_values=pixels)
        image_embeds = getattr(image_embeds, "pooler_output", image_embeds)
        pseudo = lincir.phi(image_embeds)  # no normalisation before Phi (l2_normalize off)
        ids = open_clip.get_tokenizer("ViT-B-32")(prompts)
        want = F.normalize(authors_text_features(lincir.clip, ids, pseudo), dim=-1)
        gallery = F.normalize(image_embeds, dim=-1)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    assert torch.allclose(lincir.encode_gallery(images), gallery, atol=1e-5)
    assert pixels.shape[-2:] == (224, 224)  # CLIPImageProcessor: shortest edge 224, centre crop
    assert lincir.notes and "not the authors' CLIP ViT-L/14" in lincir.notes[0]


def test_lincir_files_missing_or_damaged_are_named(tiny_weights, tmp_path):
    root = tmp_path / "w"
    with pytest.raises(MissingWeightsError, match=r"lincir/lincir_large.pt[\s\S]*navervision/zeroshot-cir-models"):
        get_composer("lincir", root)
    shutil.copytree(tiny_weights / "lincir", root / "lincir")
    (root / "lincir" / "clip-vit-large-patch14" / "model.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match=r"model.safetensors[\s\S]*pytorch_model.bin"):
        get_composer("lincir", root)
    shutil.copy(tiny_weights / "lincir" / "clip-vit-large-patch14" / "model.safetensors",
                root / "lincir" / "clip-vit-large-patch14" / "model.safetensors")
    torch.save({"phi": {}}, root / "lincir" / "lincir_large.pt")
    with pytest.raises(BadWeightsError, match="expected the authors' format"):
        get_composer("lincir", root)
    (root / "lincir" / "lincir_large.pt").write_text("<!DOCTYPE html>" + "x" * 4096)
    with pytest.raises(BadWeightsError, match="HTML"):
        get_composer("lincir", root)


@pytest.mark.parametrize("name", ["lincir"])
def test_real_weights_when_present(name, images):
    """Runs only where the authors' files are on disk ($CIR_BENCH_WEIGHTS or ~/.cache/cir-bench/weights)."""
    from cir_bench_baselines import BASELINES

    from .conftest import USER_WEIGHTS_ROOT

    missing = [f.path for f in BASELINES.get(name).required_files() if f.find(USER_WEIGHTS_ROOT) is None]
    if missing:
        pytest.skip(f"real weights absent: {', '.join(str(USER_WEIGHTS_ROOT / m) for m in missing)}")
    c = get_composer(name, USER_WEIGHTS_ROOT)
    assert not c.notes, c.notes
    q = c.encode_query(images[:2], ["is red", "is blue"])
    assert q.shape == (2, 768) and torch.isfinite(q).all()
