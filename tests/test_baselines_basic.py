"""BASIC on tiny CLIP weights: its scores against a transcription of the authors'
calculate_rankings (method "basic", the run_retrieval.py preset) and contextualize; its files
named when missing, damaged or asking for code."""
from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("open_clip")

from cir_bench_baselines import get_composer  # noqa: E402
from cir_bench_baselines.base import BadWeightsError, MissingWeightsError  # noqa: E402

from .tiny_weights import STYLES, SUBJECTS  # noqa: E402


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(17)
    return [Image.fromarray((rng.random((36 + 3 * i, 40, 3)) * 255).astype("uint8")) for i in range(30)]


def authors_contextualize(text_features, real_text, corpus, number=100):
    """utils_features.contextualize: "corpus text" and "text corpus", normalised features, averaged."""
    number = min(number, len(corpus))
    features_1 = text_features([f"{corpus[i]} {t}" for t in real_text for i in range(number)])
    features_2 = text_features([f"{t} {corpus[i]}" for t in real_text for i in range(number)])
    dim = features_1.shape[1]
    all_features = torch.cat([features_1.view(len(real_text), number, dim),
                              features_2.view(len(real_text), number, dim)], dim=1)
    return all_features.mean(dim=1)


def authors_basic(image_features, text_features, database_features, text_corpus_pos, text_corpus_neg, laion_mean,
                  generated, aa=0.2, num_pc=250.0, harris_lambda=0.1):
    """utils_retrieval.calculate_rankings, method "basic" with the preset: standardize (LAION mean),
    project, query expansion, normalize similarities, Harris fusion; returns sim_all."""
    image_features = image_features / image_features.norm(dim=1, keepdim=True)
    text_features = text_features / text_features.norm(dim=1, keepdim=True)
    database_features = database_features / database_features.norm(dim=1, keepdim=True)
    text_corpus_pos = text_corpus_pos / text_corpus_pos.norm(dim=1, keepdim=True)
    text_corpus_neg = text_corpus_neg / text_corpus_neg.norm(dim=1, keepdim=True)
    mean_img = database_features.mean(0, keepdim=True)
    mean_txt = text_corpus_pos.mean(0, keepdim=True)
    mean_img = laion_mean
    centered_database_features = database_features - mean_img
    centered_image_features = image_features - mean_img
    centered_corpus_pos_features = text_corpus_pos - mean_txt
    centered_corpus_neg_features = text_corpus_neg - mean_txt
    centered_text_features = text_features - mean_txt
    A, B = centered_corpus_pos_features, centered_corpus_neg_features
    Sa = A.T @ A / (A.size(0) - 1)
    Sb = B.T @ B / (B.size(0) - 1)
    C = (1 - aa) * (Sa) - aa * Sb + 1e-5
    L, Vy_t2 = torch.linalg.eigh(C)
    L = L.flip(dims=[0])
    Vy_t = -Vy_t2.flip(dims=[1]).T
    Nc = int(num_pc)
    mask_l = L > 0
    Nc = min(Nc, sum(mask_l).item())
    Vy_t = Vy_t[:Nc]
    projection_matrix = Vy_t.T @ Vy_t
    proj_image_features = centered_image_features @ projection_matrix
    proj_database_features = centered_database_features
    extra_features = centered_database_features
    init_sim_img = proj_image_features @ extra_features.t()
    top_values, top_indices = torch.topk(init_sim_img, 25)
    top_features = (centered_database_features).cpu()[top_indices.cpu()]
    top_features = torch.cat((top_features, centered_image_features.unsqueeze(1).cpu()), dim=1)
    top_values = torch.cat((top_values, torch.ones((top_values.shape[0], 1))), dim=1)
    top_values = torch.exp(.1 * top_values)
    top_values = top_values / top_values.sum(dim=1).unsqueeze(-1)
    top_features = top_features * top_values.unsqueeze(-1).cpu()
    top_features = top_features.sum(dim=1)
    proj_image_features = (top_features) @ projection_matrix
    sim_img = (proj_image_features) @ (proj_database_features).t()
    sim_text = centered_text_features @ (centered_database_features).t()
    image_features_generated = torch.Tensor(generated['image_features'])
    text_features_generated = torch.Tensor(generated['text_features'])
    image_features_generated = image_features_generated / image_features_generated.norm(dim=1, keepdim=True)
    text_features_generated = text_features_generated / text_features_generated.norm(dim=1, keepdim=True)
    image_features_generated -= mean_img
    text_features_generated -= mean_txt
    sim_img_gen = image_features_generated @ image_features_generated.t()
    sim_text_gen = text_features_generated @ image_features_generated.t()
    sim_img_min, sim_text_min = sim_img_gen.cpu().min(), sim_text_gen.cpu().min()
    sim_text = (sim_text - sim_text_min) / sim_img_min.abs()
    sim_img = (sim_img - sim_img_min) / sim_img_min.abs()
    sim_text = torch.clamp(sim_text, min=0)
    sim_img = torch.clamp(sim_img, min=0)
    return sim_text * sim_img - harris_lambda * (sim_text + sim_img) ** 2


def test_basic_scores_equal_the_authors_arithmetic(tiny_weights, images, no_network):
    c = get_composer("basic", tiny_weights)
    refs, gallery_images = images[:4], images[4:]
    gallery = c.encode_gallery(gallery_images)
    texts = ["cartoon", "sketch", "cartoon", "origami"]
    got = c.query_scores(refs, texts, gallery)
    with open(tiny_weights / "basic" / "laion_1m_mean_clip.pkl", "rb") as f:  # the test's own file
        laion_mean = pickle.load(f)["laion_1m_mean"]
    generated = np.load(tiny_weights / "basic" / "dataset_1_sd_clip.pkl.npy", allow_pickle=True).item()
    with torch.no_grad():
        want = authors_basic(c.encode_gallery(refs), authors_contextualize(c.encode_texts, texts, SUBJECTS), gallery,
                             c.encode_texts(SUBJECTS), c.encode_texts(STYLES), laion_mean, generated)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    assert not torch.allclose(got[0], got[1], atol=1e-4)  # another text, another ranking
    assert c.condition_text("synthart", [[("style", "hatched")]]) == ["hatched"]
    assert c.notes and "not the authors' ViT-L-14" in c.notes[0]


def test_basic_files_missing_damaged_or_asking_for_code_are_named(tiny_weights, tmp_path):
    root = tmp_path / "w"
    shutil.copytree(tiny_weights / "clip", root / "clip")
    with pytest.raises(MissingWeightsError, match=r"basic/generic_subjects.csv[\s\S]*billpsomas/icir"):
        get_composer("basic", root)
    shutil.copytree(tiny_weights / "basic", root / "basic")
    mean = root / "basic" / "laion_1m_mean_clip.pkl"

    class Payload:  # a pickle that would run code when loaded
        def __reduce__(self):
            return (print, ("ran",))

    mean.write_bytes(pickle.dumps({"laion_1m_mean": Payload()}) + b"\0" * 512)
    with pytest.raises(BadWeightsError, match="refused global builtins.print"):
        get_composer("basic", root)
    shutil.copy(tiny_weights / "basic" / "laion_1m_mean_clip.pkl", mean)
    synthetic = root / "basic" / "dataset_1_sd_clip.pkl.npy"
    np.save(synthetic, np.zeros((16, 16), dtype="float32"))
    with pytest.raises(BadWeightsError, match="expected the authors' np.save of a dict"):
        get_composer("basic", root)
    synthetic.write_text("<html>" + "x" * 1024)
    with pytest.raises(BadWeightsError, match="HTML"):
        get_composer("basic", root)


def test_real_weights_when_present(images):
    """Runs only where the authors' files are on disk ($CIR_BENCH_WEIGHTS or ~/.cache/cir-bench/weights)."""
    from cir_bench_baselines import BASELINES

    from .conftest import USER_WEIGHTS_ROOT

    missing = [f.path for f in BASELINES.get("basic").required_files() if f.find(USER_WEIGHTS_ROOT) is None]
    if missing:
        pytest.skip(f"real weights absent: {', '.join(str(USER_WEIGHTS_ROOT / m) for m in missing)}")
    c = get_composer("basic", USER_WEIGHTS_ROOT)
    assert not c.notes, c.notes
    scores = c.query_scores(images[:2], ["cartoon", "sketch"], c.encode_gallery(images))
    assert scores.shape == (2, len(images)) and torch.isfinite(scores).all()
