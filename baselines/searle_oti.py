"""SEARLE's optimisation-based textual inversion, OTI (Baldrati, Agnolucci et al., ICCV 2023;
miccunifi/SEARLE src/oti_inversion.py, read at a9c314b): a pseudo-word optimised for each
reference image, where ``searle`` predicts it with the distilled network Phi. The CoIR twin of
Backward Search (per-query optimisation) against its student (one forward pass).

Per reference image (targetpad 1.25, CLIP 224 px; OpenAI ViT-B/32, ``backbone=ViT-L-14`` for XL):

1. concepts: the ``top_k`` (15) Open Images class names nearest the image, from its 250 nearest
   (names stripped, duplicates dropped), each name embedded as the mean of its normalised
   encodings in SEARLE's 24 templates (image_concepts_association.py);
2. their GPT-Neo phrases (``concept_to_phrases.pkl``), leaving out every concept with a phrase
   that does not contain it;
3. ``steps`` (350) AdamW steps (lr 2e-2, weight decay 0.01) on a token v ~ N(0, 0.02^2): each
   step draws a template t and one phrase p of concept c, and minimises
   (lambda_cos * (1 - cos(E("t with $"; v), image)) + lambda_gpt * (1 - cos(E(p with c -> $; v),
   E(p)))) / (lambda_cos + lambda_gpt), with lambda_cos 1, lambda_gpt 0.5 (E: CLIP's text
   encoder, $ the placeholder's embedding replaced by v at its first occurrence);
4. an exponential moving average of v (decay 0.99) is the image's pseudo-word, used as SEARLE
   uses Phi's: query = normalize(E("a photo of $ that {T}"; v_ema)).

Files (never downloaded): the CLIP backbone as for SEARLE, ``searle/GPTNeo27B/concept_to_phrases.pkl``
(release asset GPTNeo27B.zip of miccunifi/SEARLE, CC BY-NC 4.0; a pickle of str -> list of str,
read with an unpickler that refuses every global) and ``searle/oidv7-class-descriptions.csv``
(data/ of miccunifi/SEARLE; Open Images V7 class names).

Deviations, for batch independence and CPUs: each image draws its templates, phrases and start
from its own random stream (seeded by ``seed`` and the image's pixels) and its loss is not divided
by the batch size (Adam's normalisation cancels that factor but for its epsilon), so a query's
pseudo-word does not depend on which images share its batch; float32 throughout (the authors
use CUDA autocast).
"""
from __future__ import annotations

import csv
import hashlib
import io
import pickle
import random
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from cir_bench.paths import load_cached, save_torch
from cir_bench_baselines.base import BASELINES, BadWeightsError, WeightsFile, load_state, require, \
    resolve_weights_root
from cir_bench_baselines.clip_common import CLIPComposer, build_clip, encode_text_with_pseudo_tokens, placeholder_id
from cir_bench_baselines.searle import SEARLE, SEARLE_LICENCE, clip_file

PHRASES = WeightsFile("searle/GPTNeo27B/concept_to_phrases.pkl",
                      "release asset GPTNeo27B.zip of github.com/miccunifi/SEARLE (unzipped)", SEARLE_LICENCE)
CONCEPTS = WeightsFile("searle/oidv7-class-descriptions.csv", "data/oidv7-class-descriptions.csv of "
                       "github.com/miccunifi/SEARLE (the Open Images V7 class names)",
                       "CC BY-NC 4.0 (the repository); the names are Open Images V7's (CC BY 4.0)",
                       min_bytes=16, kind="text")
# SEARLE's templates (src/utils.py get_templates, after PALAVRA)
TEMPLATES = ("This is a photo of a {}", "This photo contains a {}", "A photo of a {}",
             "This is an illustration of a {}", "This illustration contains a {}", "An illustrations of a {}",
             "This is a sketch of a {}", "This sketch contains a {}", "A sketch of a {}", "This is a diagram of a {}",
             "This diagram contains a {}", "A diagram of a {}", "A {}", "We see a {}", "{}",
             "We see a {} in this photo", "We see a {} in this image", "We see a {} in this illustration",
             "We see a {} photo", "We see a {} image", "We see a {} illustration", "{} photo", "{} image",
             "{} illustration")
CONCEPTS_PER_IMAGE = 250


class _NoGlobals(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def read_phrases(path: Path) -> dict[str, list[str]]:
    """concept_to_phrases.pkl: a dict of str -> list of str, unpickled without any global."""
    PHRASES.check(path)
    try:
        data = _NoGlobals(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise BadWeightsError(f"{path}: not the authors' concept_to_phrases.pkl ({err}); get {PHRASES.source} "
                              "again") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, list) for k, v in data.items()):
        raise BadWeightsError(f"{path}: expected a dict of concept -> list of phrases, got {type(data).__name__}")
    return data


def read_concepts(path: Path) -> list[str]:
    """The DisplayName column of oidv7-class-descriptions.csv."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or "DisplayName" not in rows[0]:
        raise BadWeightsError(f"{path}: no DisplayName column; get {CONCEPTS.source} again")
    return [row["DisplayName"] for row in rows]


def usable_concepts(phrases: dict[str, list[str]]) -> set[str]:
    """Concepts whose every phrase contains the concept (the authors filter out the others)."""
    return {k for k, v in phrases.items() if all("$" in p.replace(k, " $ ", 1) for p in v)}


def image_phrases(ranked: Sequence[str], phrases: dict[str, list[str]], usable: set[str], top_k: int
                  ) -> tuple[list[str], list[str]]:
    """The phrases of an image's ``top_k`` concepts (ranked names stripped, duplicates dropped)
    and, for each phrase, its concept."""
    out, concepts = [], []
    for word in list(dict.fromkeys(str(w).strip() for w in ranked))[:top_k]:
        if word not in usable:
            continue
        for phrase in phrases[word]:
            out.append(phrase)
            concepts.append(word)
    return out, concepts


def oti_draws(rng: random.Random, steps: int, n_phrases: int) -> list[tuple[int, int]]:
    """Per step: the template index and the phrase index."""
    return [(rng.randrange(len(TEMPLATES)), rng.randrange(n_phrases)) for _ in range(steps)]


class SEARLEOTI(CLIPComposer):
    name = "searle-oti"
    prompt_template = SEARLE.prompt_template
    placeholder = SEARLE.placeholder
    target_pad = SEARLE.target_pad

    def __init__(self, clip: nn.Module, phrases: dict[str, list[str]], concepts: Sequence[str], image_size: int,
                 backbone: str = "ViT-B-32", steps: int = 350, lr: float = 2e-2, weight_decay: float = 0.01,
                 lambda_cos: float = 1.0, lambda_gpt: float = 0.5, ema_decay: float = 0.99, top_k: int = 15,
                 seed: int = 42, device: str = "cpu", batch_size: int = 32) -> None:
        super().__init__(clip, image_size, device, batch_size)
        self.phrases, self.concepts, self.backbone = phrases, list(concepts), backbone
        self.usable = usable_concepts(phrases)
        self.steps, self.lr, self.weight_decay = int(steps), float(lr), float(weight_decay)
        self.lambda_cos, self.lambda_gpt, self.ema_decay = float(lambda_cos), float(lambda_gpt), float(ema_decay)
        self.top_k, self.seed = int(top_k), int(seed)
        if self.steps < 1 or self.top_k < 1:
            raise ValueError(f"searle-oti: steps and top_k must be >= 1, got {steps}, {top_k}")
        self.placeholder_id = placeholder_id(self.tokenizer, self.placeholder)
        self.cache_folder: Path | None = None
        self._dictionary: torch.Tensor | None = None

    @staticmethod
    def required_files(backbone: str = "ViT-B-32", **_: Any) -> list[WeightsFile]:
        return [clip_file(backbone), PHRASES, CONCEPTS]

    @classmethod
    def from_weights(cls, weights_dir: str | Path | None = None, backbone: str = "ViT-B-32",
                     config_dir: str | None = None, device: str = "cpu", batch_size: int = 32,
                     **settings: Any) -> "SEARLEOTI":
        root, how = resolve_weights_root(weights_dir, config_dir)
        files = cls.required_files(backbone)
        paths = require(cls.name, files, root, how)
        clip_path, phrases_path, concepts_path = (paths[f.path] for f in files)
        CONCEPTS.check(concepts_path)
        phrases, concepts = read_phrases(phrases_path), read_concepts(concepts_path)
        clip, cfg = build_clip(load_state(clip_path, files[0]), str(clip_path))
        out = cls(clip, phrases, concepts, cfg["vision_cfg"]["image_size"], backbone, device=device,
                  batch_size=batch_size, **settings)
        return out.finish(paths, cfg, backbone)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "backbone": self.backbone, "steps": self.steps, "lr": self.lr,
                "weight_decay": self.weight_decay, "lambda_cos": self.lambda_cos, "lambda_gpt": self.lambda_gpt,
                "ema_decay": self.ema_decay, "top_k": self.top_k, "seed": self.seed}

    def use_cache(self, folder: Path) -> None:
        """Keep the concept dictionary's embeddings (20,931 names x 24 templates) under ``folder``."""
        self.cache_folder = Path(folder)

    def dictionary(self) -> torch.Tensor:
        """Each concept's embedding: the normalised mean of its normalised template encodings."""
        if self._dictionary is None:
            path = None if self.cache_folder is None else \
                self.cache_folder / f"{self.name}-{self.cache_key()}-concepts.pt"
            cached = None if path is None else load_cached(
                path, lambda p: torch.load(p, map_location="cpu", weights_only=True))
            if cached is not None and cached["concepts"] == self.concepts:
                self._dictionary = cached["z"]
            else:
                rows = [self.encode_texts([t.format(f" {name} ") for t in TEMPLATES]).mean(dim=0)
                        for name in self.concepts]
                self._dictionary = F.normalize(torch.stack(rows), dim=-1)
                if path is not None:
                    save_torch({"concepts": self.concepts, "z": self._dictionary}, path)
        return self._dictionary

    def _seed(self, pixels: torch.Tensor) -> int:
        digest = hashlib.sha256(pixels.detach().cpu().contiguous().numpy().tobytes()).digest()
        return self.seed ^ int.from_bytes(digest[:8], "little")

    def _encode_queries(self, pixels: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        features = self.clip.encode_image(pixels).float()
        ranked = torch.topk(F.normalize(features, dim=-1).cpu() @ self.dictionary().T,
                            min(CONCEPTS_PER_IMAGE, len(self.concepts)), dim=1).indices
        starts, draws, chosen = [], [], []
        for i in range(len(pixels)):
            phrases, concepts = image_phrases([self.concepts[j] for j in ranked[i].tolist()], self.phrases,
                                              self.usable, self.top_k)
            if not phrases:
                raise BadWeightsError(f"searle-oti: no GPT phrases for any of the image's {self.top_k} nearest "
                                      f"concepts: {PHRASES.path} does not cover {CONCEPTS.path}")
            rng = random.Random(self._seed(pixels[i]))
            gen = torch.Generator().manual_seed(rng.getrandbits(63))
            starts.append(torch.randn(self.clip.token_embedding.embedding_dim, generator=gen) * 0.02)
            draws.append(oti_draws(rng, self.steps, len(phrases)))
            chosen.append((phrases, concepts))
        with torch.inference_mode(False), torch.enable_grad():
            tokens = self.invert(features.clone(), torch.stack(starts).to(self.device), draws, chosen)
        wrapped = self.tokenizer(list(prompts)).to(self.device)
        return encode_text_with_pseudo_tokens(self.clip, wrapped, tokens, self.placeholder_id)

    def invert(self, image_features: torch.Tensor, start: torch.Tensor, draws: list[list[tuple[int, int]]],
               chosen: list[tuple[list[str], list[str]]]) -> torch.Tensor:
        """The EMA pseudo-words of a batch of images (rows independent of each other)."""
        token = nn.Parameter(start.clone())
        ema = token.detach().clone()
        optimizer = torch.optim.AdamW([token], lr=self.lr, weight_decay=self.weight_decay)
        for step in range(self.steps):
            optimizer.zero_grad()
            picks = [draws[i][step] for i in range(len(start))]
            templates = [TEMPLATES[t].format(" $ ") for t, _ in picks]
            phrases = [chosen[i][0][p] for i, (_, p) in enumerate(picks)]
            with_token = [phrase.replace(chosen[i][1][p], " $ ", 1) for i, ((_, p), phrase)
                          in enumerate(zip(picks, phrases))]
            template_features = self._encode_first(templates, token)
            with torch.no_grad():
                phrase_features = self.clip.encode_text(self.tokenizer(phrases).to(self.device))
            token_phrase_features = self._encode_first(with_token, token)
            cos_loss = 1 - F.cosine_similarity(template_features, image_features, dim=-1)
            gpt_loss = 1 - F.cosine_similarity(token_phrase_features, phrase_features, dim=-1)
            loss = ((self.lambda_cos * cos_loss + self.lambda_gpt * gpt_loss) / (self.lambda_cos + self.lambda_gpt))
            loss.sum().backward()
            optimizer.step()
            ema = self.ema_decay * ema + (1 - self.ema_decay) * token.detach()
        return ema

    def _encode_first(self, texts: Sequence[str], token: torch.Tensor) -> torch.Tensor:
        """E(text; token), the placeholder's first occurrence replaced (the authors' encode_with_pseudo_tokens)."""
        ids = self.tokenizer(list(texts)).to(self.device)
        return encode_text_with_pseudo_tokens(self.clip, ids, token, self.placeholder_id, first_only=True)


BASELINES.register("searle-oti")(SEARLEOTI)
