"""FreeDom (Efthymiadis, Psomas et al., WACV 2025): training-free composed retrieval for
domain conversion, on a frozen CLIP and a corpus of words (NikosEfth/freedom, MIT).

For a reference image with CLIP feature q and the target domain's word t (every feature
L2-normalised; the corpus words encoded alone, the queries' texts as ``"{word} {t}"``):

1. N = the ``kappa`` gallery features most similar to q, best first; when the gallery does not
   hold the image itself (its best similarity < 0.98) q takes the first place and the last
   neighbour is dropped;
2. for each of the ``kappa`` features in N, the ``ni`` corpus words most similar to it;
3. the ``miu`` most frequent of those words (ties: first appearance, best neighbour and best
   word first), weighted by count / largest count;
4. query = sum over those words w of weight_w * normalize(encode_text("{w} {t}")), scored as
   query @ gallery^T without normalising (as the authors rank it).

Defaults ``kappa=20, miu=7, ni=7`` (run_retrieval.py); backbone OpenAI ViT-L/14 at 224 px
(``clip/ViT-L-14.pt``, shared with the other CLIP adapters); corpus: the authors'
``data/open_image_v7_class_names.csv`` (20,931 Open Images V7 class names), placed at
``freedom/open_image_v7_class_names.csv``; its text features are computed once and cached.

One deviation: the authors decide step 1's "add the image itself" once for all queries of a
source domain (by the least similar one); here each query decides for itself, as their code
decides for a batch of one query, so a query's ranking does not depend on which other queries
share its batch. The two agree whenever every query is in the gallery (the image is then its
own first neighbour), or none is and none has a near-duplicate (similarity >= 0.98) there.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from PIL import Image

from cir_bench.paths import load_cached, save_torch
from cir_bench_baselines.base import BASELINES, FusedScores, WeightsFile, load_state, read_first_column, require, \
    resolve_weights_root
from cir_bench_baselines.clip_common import CLIPComposer, build_clip
from cir_bench_baselines.searle import clip_file

CORPUS = WeightsFile("freedom/open_image_v7_class_names.csv",
                     "data/open_image_v7_class_names.csv of github.com/NikosEfth/freedom (the Open Images V7 class "
                     "names)", "MIT (the repository); the names are Open Images V7's class descriptions (CC BY 4.0)",
                     min_bytes=16, kind="text")
SELF_SIMILARITY = 0.98  # the authors' threshold for "the gallery holds the query image"


def most_frequent_words(words: Sequence[Sequence[str]], miu: int) -> tuple[list[str], list[float]]:
    """The ``miu`` most frequent words over the neighbours' word lists (in rank order) and their
    weights count / largest count; equal counts keep the order of first appearance."""
    counts: dict[str, int] = {}
    for neighbour in words:
        for word in neighbour:
            counts[word] = counts.get(word, 0) + 1
    kept = sorted(counts, key=lambda w: counts[w], reverse=True)[:miu]  # stable: first appearance wins ties
    top = max(counts[w] for w in kept)
    return kept, [counts[w] / top for w in kept]


class FreeDom(FusedScores, CLIPComposer):
    name = "freedom"
    text_source = "words"  # the target domain's word: "cartoon", not a sentence
    prompt_template = "{T}"

    def __init__(self, clip: nn.Module, corpus: Sequence[str], image_size: int, backbone: str = "ViT-L-14",
                 kappa: int = 20, miu: int = 7, ni: int = 7, device: str = "cpu", batch_size: int = 32) -> None:
        super().__init__(clip, image_size, device, batch_size)
        for key, value in (("kappa", kappa), ("miu", miu), ("ni", ni)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"freedom: {key} must be a positive integer, got {value!r}")
        if ni > len(corpus):
            raise ValueError(f"freedom: ni={ni} words per neighbour but the corpus holds {len(corpus)}")
        self.corpus, self.backbone = list(corpus), backbone
        self.kappa, self.miu, self.ni = kappa, miu, ni
        self.cache_folder: Path | None = None
        self._corpus_features: torch.Tensor | None = None

    @staticmethod
    def required_files(backbone: str = "ViT-L-14", **_: Any) -> list[WeightsFile]:
        return [clip_file(backbone), CORPUS]

    @classmethod
    def from_weights(cls, weights_dir: str | Path | None = None, backbone: str = "ViT-L-14", kappa: int = 20,
                     miu: int = 7, ni: int = 7, config_dir: str | None = None, device: str = "cpu",
                     batch_size: int = 32) -> "FreeDom":
        root, how = resolve_weights_root(weights_dir, config_dir)
        files = cls.required_files(backbone)
        paths = require(cls.name, files, root, how)
        clip_path, corpus_path = paths[files[0].path], paths[files[1].path]
        CORPUS.check(corpus_path)
        clip, cfg = build_clip(load_state(clip_path, files[0]), str(clip_path))
        out = cls(clip, read_first_column(corpus_path, CORPUS), cfg["vision_cfg"]["image_size"], backbone, kappa,
                  miu, ni, device, batch_size)
        return out.finish(paths, cfg, backbone)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "backbone": self.backbone, "kappa": self.kappa, "miu": self.miu,
                "ni": self.ni}

    def use_cache(self, folder: Path) -> None:
        """Keep the corpus's text features under ``folder`` (20,931 texts through ViT-L/14)."""
        self.cache_folder = Path(folder)

    def corpus_features(self) -> torch.Tensor:
        if self._corpus_features is None:
            path = None
            if self.cache_folder is not None:
                path = self.cache_folder / f"{self.cache_key()}-corpus.pt"
                cached = load_cached(path, lambda p: torch.load(p, map_location="cpu", weights_only=True))
                if cached is not None and cached["words"] == self.corpus:
                    self._corpus_features = cached["z"]
            if self._corpus_features is None:
                self._corpus_features = self.encode_texts(self.corpus)
                if path is not None:
                    save_torch({"words": self.corpus, "z": self._corpus_features}, path)
        return self._corpus_features

    def fused_scores(self, images: Sequence[Image.Image], prompts: list[str], gallery: torch.Tensor) -> torch.Tensor:
        queries = self.encode_gallery(images)  # normalize(encode_image(ref))
        corpus = self.corpus_features()
        kappa = min(self.kappa, gallery.shape[0])
        fused = []
        for q, domain in zip(queries, prompts):
            sim = gallery @ q
            best, order = torch.topk(sim, kappa)
            neighbours = gallery[order]
            if float(best[0]) < SELF_SIMILARITY:  # the image is not in the gallery: it leads its neighbours
                neighbours = torch.cat([q[None], neighbours[:-1]])
            word_ids = torch.topk(neighbours @ corpus.T, self.ni, dim=1).indices
            words, weights = most_frequent_words([[self.corpus[i] for i in row] for row in word_ids.tolist()],
                                                 self.miu)
            texts = self.encode_texts([f"{w} {domain}" for w in words])
            fused.append((torch.tensor(weights)[:, None] * texts).sum(dim=0))
        return torch.stack(fused) @ gallery.T if fused else torch.zeros(0, gallery.shape[0])


BASELINES.register("freedom")(FreeDom)
