"""SEARLE-OTI on tiny CLIP weights: the concepts, phrases and inversion against plain
transcriptions of the authors' image_concepts_association.py and oti_inversion.py; batch
independence; its files named when missing or damaged."""
from __future__ import annotations

import pickle
import random
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("open_clip")

from cir_bench_baselines import get_composer  # noqa: E402
from cir_bench_baselines.base import BadWeightsError, MissingWeightsError  # noqa: E402
from cir_bench_baselines.searle_oti import TEMPLATES, image_phrases, oti_draws  # noqa: E402

from .tiny_weights import CORPUS_WORDS, tiny_phrases  # noqa: E402


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(5)
    return [Image.fromarray((rng.random((36 + 4 * i, 44, 3)) * 255).astype("uint8")) for i in range(4)]


@pytest.fixture(scope="module")
def oti(tiny_weights):
    return get_composer("searle-oti", tiny_weights, steps=12)


def authors_encode_with_pseudo_tokens(clip, text, pseudo_tokens):
    """SEARLE's src/encode_with_pseudo_tokens.py (num_tokens=1) on an open_clip model (batch-first
    transformer): the first "$" of each row takes the row's pseudo-token."""
    dollar = 259  # the BPE id of "$", as the authors hard-code it
    x = clip.token_embedding(text)
    _, counts = torch.unique((text == dollar).nonzero(as_tuple=True)[0], return_counts=True)
    cum_sum = torch.cat((torch.zeros(1, device=text.device).int(), torch.cumsum(counts, dim=0)[:-1]))
    first_tokens_indexes = (text == dollar).nonzero()[cum_sum][:, 1]
    x[torch.arange(x.shape[0]), first_tokens_indexes] = pseudo_tokens.to(x.dtype)
    x = x + clip.positional_embedding
    x = clip.transformer(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)
    return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ clip.text_projection


def authors_oti(clip, tokenize, image_features, phrases, concepts, start, draws, steps, lr=2e-2,
                weight_decay=0.01, lambda_cos=1.0, lambda_gpt=0.5, ema_decay=0.99):
    """The optimisation loop of SEARLE's oti_inversion.py for a batch of one image, its random
    draws given (template index, phrase index per step), float32."""
    oti_pseudo_tokens = torch.nn.Parameter(start.clone())
    ema_oti_pseudo_tokens = oti_pseudo_tokens.clone().detach()
    optimizer = torch.optim.AdamW([oti_pseudo_tokens], lr=lr, weight_decay=weight_decay)
    criterion = torch.nn.CosineEmbeddingLoss()
    criterion_target = torch.as_tensor([1])
    for step in range(steps):
        optimizer.zero_grad()
        t, p = draws[step]
        template_oti_texts = [TEMPLATES[t].format(" $ ")]
        reg_gpt_phrases = [phrases[p]]
        oti_gpt_phrases = [reg_gpt_phrases[0].replace(concepts[p], " $ ", 1)]
        template_oti_features = authors_encode_with_pseudo_tokens(clip, tokenize(template_oti_texts),
                                                                  oti_pseudo_tokens)
        reg_gpt_features = clip.encode_text(tokenize(reg_gpt_phrases))
        reg_oti_gpt_features = authors_encode_with_pseudo_tokens(clip, tokenize(oti_gpt_phrases), oti_pseudo_tokens)
        cosine_loss = criterion(template_oti_features, image_features, criterion_target)
        gpt_loss = criterion(reg_oti_gpt_features, reg_gpt_features, criterion_target)
        oti_loss = (lambda_cos * cosine_loss + lambda_gpt * gpt_loss) / (lambda_cos + lambda_gpt)
        oti_loss.backward()
        optimizer.step()
        ema_oti_pseudo_tokens = ema_decay * ema_oti_pseudo_tokens + (1 - ema_decay) * oti_pseudo_tokens
    return ema_oti_pseudo_tokens.detach()


def authors_concepts(clip, tokenize, image_feature, concept_names, concept_to_phrases, top_k=15):
    """image_concepts_association.py's dictionary and nearest concepts, then oti_inversion.py's
    filter and phrase list for one image."""
    rows = []
    for text in concept_names:
        feat = clip.encode_text(tokenize([f"{template.format(f' {text} ')}" for template in TEMPLATES]))
        feat /= feat.norm(dim=-1, keepdim=True)
        feat = feat.mean(dim=0)
        feat /= feat.norm()
        rows.append(feat)
    dictionary = F.normalize(torch.stack(rows), dim=-1)
    similarity = F.normalize(image_feature, dim=-1) @ dictionary.T
    ranked = [concept_names[i] for i in torch.topk(similarity, min(250, len(concept_names))).indices.tolist()]
    filtered = {k for k, v in concept_to_phrases.items() for phrase in v if "$" not in phrase.replace(k, " $ ", 1)}
    l_phrases, l_concepts = [], []
    for w in list(dict.fromkeys(str(w).strip() for w in ranked))[:top_k]:
        if w in filtered:
            continue
        for p in concept_to_phrases[w]:
            l_phrases.append(p)
            l_concepts.append(w)
    return l_phrases, l_concepts


def test_concepts_and_phrases_follow_the_authors(oti, images):
    import open_clip

    tokenize = open_clip.get_tokenizer("ViT-B-32")
    phrases = tiny_phrases()
    with torch.no_grad():
        feature = oti.clip.encode_image(oti.preprocess(images[:1]))[0]
        want = authors_concepts(oti.clip, tokenize, feature, CORPUS_WORDS, phrases)
        ranked = torch.topk(F.normalize(feature, dim=-1) @ oti.dictionary().T, len(CORPUS_WORDS)).indices
    got = image_phrases([CORPUS_WORDS[i] for i in ranked.tolist()], oti.phrases, oti.usable, oti.top_k)
    assert got == want and len(got[0]) >= 3
    assert "Hat" not in oti.usable  # one phrase without the concept drops it, as the authors filter


def test_inversion_equals_the_authors_loop(oti, images):
    import open_clip

    tokenize = open_clip.get_tokenizer("ViT-B-32")
    phrases, concepts = [f"a {w} on the table" for w in ("Apple", "Boat")], ["Apple", "Boat"]
    draws = oti_draws(random.Random(7), oti.steps, len(phrases))
    start = torch.randn(1, oti.clip.token_embedding.embedding_dim, generator=torch.Generator().manual_seed(1)) * 0.02
    with torch.no_grad():
        feature = oti.clip.encode_image(oti.preprocess(images[:1]))
    got = oti.invert(feature, start, [draws], [(phrases, concepts)])
    want = authors_oti(oti.clip, tokenize, feature, phrases, concepts, start, draws, oti.steps)
    assert torch.allclose(got, want, atol=1e-6), float((got - want).abs().max())
    assert not torch.allclose(got, start, atol=1e-4)  # it moved


def test_queries_do_not_depend_on_their_batch_and_use_searles_prompt(oti, images):
    texts = ["is in flat style", "is red", "is a circle", "is blue"]
    together = oti.encode_query(images, texts)
    alone = torch.cat([oti.encode_query(images[i:i + 1], texts[i:i + 1]) for i in range(4)])
    assert float((together - alone).norm(dim=1).max()) <= 1e-4
    assert torch.allclose(together.norm(dim=1), torch.ones(4), atol=1e-5)
    assert oti.prompts(["is red"]) == ["a photo of $ that is red"]
    assert not torch.allclose(oti.encode_query(images[:1], ["is blue"]), together[:1], atol=1e-4)
    assert oti.notes and "not the authors' ViT-B-32" in oti.notes[0]


def test_oti_files_missing_or_damaged_are_named(tiny_weights, tmp_path):
    root = tmp_path / "w"
    shutil.copytree(tiny_weights / "clip", root / "clip")
    with pytest.raises(MissingWeightsError, match=r"concept_to_phrases.pkl[\s\S]*GPTNeo27B.zip"):
        get_composer("searle-oti", root)
    shutil.copytree(tiny_weights / "searle", root / "searle")
    pkl = root / "searle" / "GPTNeo27B" / "concept_to_phrases.pkl"

    class Payload:  # a pickle that would run code when loaded
        def __reduce__(self):
            return (print, ("ran",))

    pkl.write_bytes(pickle.dumps({"Dog": [Payload()]}) + b"\0" * 2048)
    with pytest.raises(BadWeightsError, match="refused global"):
        get_composer("searle-oti", root)
    pkl.write_text("<html>" + "x" * 2048)
    with pytest.raises(BadWeightsError, match="HTML"):
        get_composer("searle-oti", root)
    pkl.write_bytes(pickle.dumps(["not", "a", "dict"]) + b"\0" * 2048)
    with pytest.raises(BadWeightsError, match="expected a dict"):
        get_composer("searle-oti", root)
