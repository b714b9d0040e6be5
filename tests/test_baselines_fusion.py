"""clip-product and FreeDom on tiny CLIP weights: their scores against plain transcriptions of
the authors' arithmetic (FreeDom's utils_retrieval.calculate_rankings and utils.py), their
files named when missing or damaged."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("open_clip")

from cir_bench_baselines import get_composer  # noqa: E402
from cir_bench_baselines.base import BadWeightsError, MissingWeightsError  # noqa: E402
from cir_bench_baselines.freedom import most_frequent_words  # noqa: E402

from .tiny_weights import CORPUS_WORDS  # noqa: E402


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(3)
    return [Image.fromarray((rng.random((40, 32 + 5 * i, 3)) * 255).astype("uint8")) for i in range(8)]


def _text_features(clip, texts: list[str]) -> torch.Tensor:
    import open_clip

    tokens = open_clip.get_tokenizer("ViT-B-32")(texts)
    with torch.no_grad():
        f = clip.encode_text(tokens)
    return f / f.norm(dim=1, keepdim=True)


def _image_features(composer, images) -> torch.Tensor:
    with torch.no_grad():
        f = composer.clip.encode_image(composer.preprocess(images))
    return f / f.norm(dim=-1, keepdim=True)


def authors_freedom(image_features, domain, gallery, corpus_features, corpus_words, text_features,
                    kappa, miu, ni):
    """FreeDom's scores for a batch of queries of one target domain, transcribed from the authors'
    calculate_rankings (method "freedom"), get_word_indices, keep_k_most_frequent and text_to_multi."""
    sim_img = image_features @ gallery.t()
    _, ranks_img = torch.topk(sim_img, kappa, dim=1, largest=True, sorted=True)
    neighbours = gallery[ranks_img]
    if torch.min(torch.max(sim_img, 1)[0]).item() < 0.98:
        neighbours = torch.cat((image_features.unsqueeze(1), neighbours[:, 0:-1, :]), 1)
    _, top = torch.topk(torch.matmul(neighbours, corpus_features.t()), ni, dim=2, largest=True, sorted=True)
    words = np.array(corpus_words)[top.numpy()].tolist()  # (Q, kappa, ni)
    labels, weights = [], []
    for query in words:
        counts = {}
        for neighbour in query:
            for text in neighbour:
                counts[text] = counts.get(text, 0) + 1
        common = sorted(counts.keys(), key=lambda x: counts[x], reverse=True)[:miu]
        values = [counts[k] for k in common]
        labels.append(common)
        weights.append([x / max(max(values), 0.0001) for x in values])
    width = max(len(x) for x in labels)
    labels = [x + [""] * (width - len(x)) for x in labels]
    weights = [x + [0] * (width - len(x)) for x in weights]
    texts = [f"{w} {domain}" for row in labels for w in row]
    fused = (text_features(texts) * torch.tensor(weights, dtype=torch.float32).view(-1, 1))
    fused = fused.reshape(-1, width, gallery.shape[1]).sum(dim=1)
    return fused @ gallery.t()


def test_most_frequent_words_counts_in_rank_order_and_weights_by_the_largest_count():
    assert most_frequent_words([["x", "y"], ["y", "z"]], 2) == (["y", "x"], [1.0, 0.5])
    # equal counts: the word seen first (best neighbour, best word) comes first
    assert most_frequent_words([["a", "b"], ["b", "c"], ["c", "a"]], 3) == (["a", "b", "c"], [1.0, 1.0, 1.0])
    assert most_frequent_words([["d", "e"], ["e", "d"], ["f", "g"]], 1) == (["d"], [1.0])


@pytest.mark.parametrize("in_gallery", [True, False])
def test_freedom_scores_equal_the_authors_arithmetic(tiny_weights, images, no_network, in_gallery):
    c = get_composer("freedom", tiny_weights, kappa=4, miu=3, ni=3)
    refs = images[:3]
    # the gallery: spread-out unit vectors (the tiny CLIP puts every image near every other),
    # with the reference images' own vectors when they are in it
    others = torch.nn.functional.normalize(torch.randn(12, c.embed_dim, generator=torch.Generator().manual_seed(0)),
                                           dim=1)
    gallery = torch.cat([others, c.encode_gallery(refs)]) if in_gallery else others
    got = c.query_scores(refs, ["cartoon"] * 3, gallery)
    corpus = _text_features(c.clip, CORPUS_WORDS)
    features = _image_features(c, refs)

    def authors(rows: slice) -> torch.Tensor:
        return authors_freedom(features[rows], "cartoon", gallery, corpus, CORPUS_WORDS,
                               lambda t: _text_features(c.clip, t), 4, 3, 3)

    # every query in the gallery: the authors' batch; none: each query as the authors' batch of one
    # (their "add the image itself" is one decision per batch, ours one per query)
    want = authors(slice(0, 3)) if in_gallery else torch.cat([authors(slice(i, i + 1)) for i in range(3)])
    assert got.shape == (3, len(gallery))
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    # the text matters: another domain word moves the scores
    assert not torch.allclose(got, c.query_scores(refs, ["sketch"] * 3, gallery), atol=1e-4)
    assert c.notes and "not the authors' ViT-L-14" in c.notes[0]


def test_freedom_text_is_the_bare_label_and_options_are_checked(tiny_weights):
    c = get_composer("freedom", tiny_weights)
    assert c.condition_text("synthart", [[("style", "hatched")], [("style", "flat"), ("shape", "circle")]]) == \
        ["hatched", "flat circle"]
    assert (c.kappa, c.miu, c.ni) == (20, 7, 7)  # the authors' defaults
    with pytest.raises(ValueError, match="ni=40 words per neighbour but the corpus holds 30"):
        get_composer("freedom", tiny_weights, ni=40)
    with pytest.raises(ValueError, match="kappa must be a positive integer"):
        get_composer("freedom", tiny_weights, kappa=0)


def test_freedom_corpus_features_are_cached(tiny_weights, images, tmp_path):
    first = get_composer("freedom", tiny_weights, kappa=4, miu=3, ni=2)
    first.use_cache(tmp_path)
    gallery = first.encode_gallery(images)
    scores = first.query_scores(images[:2], ["toy"] * 2, gallery)
    assert len(list(tmp_path.glob("freedom-*-corpus.pt"))) == 1
    again = get_composer("freedom", tiny_weights, kappa=4, miu=3, ni=2)
    again.use_cache(tmp_path)
    again.encode_texts = None  # the corpus must come from the cache, not the text encoder
    assert torch.equal(again.corpus_features(), first.corpus_features())
    assert scores.shape == (2, len(images))


def test_freedom_corpus_missing_or_damaged_is_named(tiny_weights, tmp_path):
    root = tmp_path / "w"
    shutil.copytree(tiny_weights / "clip", root / "clip")
    with pytest.raises(MissingWeightsError, match=r"freedom/open_image_v7_class_names.csv[\s\S]*NikosEfth/freedom"):
        get_composer("freedom", root)
    corpus = root / "freedom" / "open_image_v7_class_names.csv"
    corpus.parent.mkdir()
    corpus.write_text("<!DOCTYPE html><html><body>Sign in</body></html>")
    with pytest.raises(BadWeightsError, match="HTML"):
        get_composer("freedom", root)
    corpus.write_bytes(b"\xff\xfe" + "Dog\nCat\n".encode("utf-16-le") * 4)
    with pytest.raises(BadWeightsError):
        get_composer("freedom", root)


def test_clip_product_is_the_product_of_the_two_cosine_similarities(tiny_weights, images, no_network):
    c = get_composer("clip-product", tiny_weights)
    gallery = c.encode_gallery(images)
    prompts = c.condition_text("synthart", [[("style", "hatched")], [("style", "flat")], [("shape", "circle")]])
    assert prompts == ["a photo of hatched", "a photo of flat", "a photo of circle"]
    got = c.query_scores(images[:3], prompts, gallery)
    image, text = _image_features(c, images[:3]), _text_features(c.clip, prompts)
    want = (image @ gallery.T) * (text @ gallery.T)
    assert torch.allclose(got, want, atol=1e-5)
    summed = get_composer("clip-sum", tiny_weights).query_scores(images[:3], prompts, gallery)
    assert not torch.allclose(got, summed, atol=1e-3)  # not the sum under another name
    with pytest.raises(TypeError, match="query_scores"):
        c.encode_query(images[:1], prompts[:1], wrapped=True)


@pytest.mark.parametrize("name", ["freedom", "clip-product"])
def test_real_weights_when_present(name, images, tmp_path):
    """Runs only where the authors' files are on disk ($CIR_BENCH_WEIGHTS or ~/.cache/cir-bench/weights)."""
    from cir_bench_baselines import BASELINES

    from .conftest import USER_WEIGHTS_ROOT

    missing = [f.path for f in BASELINES.get(name).required_files() if f.find(USER_WEIGHTS_ROOT) is None]
    if missing:
        pytest.skip(f"real weights absent: {', '.join(str(USER_WEIGHTS_ROOT / m) for m in missing)}")
    c = get_composer(name, USER_WEIGHTS_ROOT)
    c.use_cache(tmp_path)
    assert not c.notes, c.notes  # the real files have the authors' architecture
    scores = c.query_scores(images[:2], ["cartoon", "sketch"], c.encode_gallery(images))
    assert scores.shape == (2, len(images)) and torch.isfinite(scores).all()
