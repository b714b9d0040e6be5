"""Condition text: class label -> readable phrase -> the sentence T every baseline receives.

Committed phrase tables per dataset (docs/baselines.md) and the template family, the same
strings for every method:

    T1 canonical    style: "is in {X} style"      category: "is a {X}"           color: "is {X}"
    T2 imperative   style: "make it in {X} style" category: "change it to a {X}" color: "make it {X}"
    T3 bare label   "{X}"

Several conditions are joined with " and " ("is in Rococo style and is a portrait"). Each
adapter wraps T in its own published inference template (Pic2Word ``a photo of * , {T}``,
SEARLE ``a photo of $ that {T}``, CLIP4CIR and CoVR ``{T}``); the references use
``a photo of {labels}``. The exact strings are stored with the results.

>>> condition_text("wikiart", [("style", "Naive_Art_Primitivism"), ("genre", "portrait")], "T1")
'is in Naive Art (Primitivism) style and is a portrait'
>>> condition_text("cub", [("bird", "001.Black_footed_Albatross")], "T2")
'change it to a Black-footed Albatross'
>>> condition_text("apy", [("category", "aeroplane")], "T1")
'is an airplane'
"""
from __future__ import annotations

import re
from typing import Sequence

TEMPLATES = ("T1", "T2", "T3")

# what kind of property a (dataset, property) is: it picks the verb of the template
KINDS: dict[tuple[str, str], str] = {
    ("synthart", "style"): "style", ("synthart", "shape"): "category", ("synthart", "color"): "color",
    ("wikiart", "style"): "style", ("wikiart", "genre"): "genre",
    ("cub", "bird"): "category", ("apy", "category"): "category",
    ("domains", "domain"): "style",  # "is in sketch style": the domain-conversion protocol's target domain
}

FORMS: dict[str, dict[str, str]] = {
    "style": {"T1": "is in {X} style", "T2": "make it in {X} style", "T3": "{X}"},
    "genre": {"T1": "is {a} {X}", "T2": "make it {a} {X}", "T3": "{X}"},
    "category": {"T1": "is {a} {X}", "T2": "change it to {a} {X}", "T3": "{X}"},
    "color": {"T1": "is {X}", "T2": "make it {X}", "T3": "{X}"},
}

# label -> phrase, per dataset and property (the class names of each dataset's release)
PHRASES: dict[str, dict[str, dict[str, str]]] = {
    "synthart": {
        "style": {"flat": "flat", "outline": "outline", "hatched": "hatched", "dotted": "dotted",
                  "gradient": "gradient", "mosaic": "mosaic"},
        "shape": {s: s for s in ("circle", "square", "triangle", "star", "hexagon", "cross", "ring", "diamond")},
        "color": {c: c for c in ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")},
    },
    "wikiart": {
        "style": {
            "Abstract_Expressionism": "Abstract Expressionism", "Action_painting": "Action Painting",
            "Analytical_Cubism": "Analytical Cubism", "Art_Nouveau": "Art Nouveau",
            "Art_Nouveau_Modern": "Art Nouveau", "Baroque": "Baroque",
            "Color_Field_Painting": "Color Field Painting", "Contemporary_Realism": "Contemporary Realism",
            "Cubism": "Cubism", "Early_Renaissance": "Early Renaissance", "Expressionism": "Expressionism",
            "Fauvism": "Fauvism", "High_Renaissance": "High Renaissance", "Impressionism": "Impressionism",
            "Mannerism_Late_Renaissance": "Mannerism (Late Renaissance)", "Minimalism": "Minimalism",
            "Naive_Art_Primitivism": "Naive Art (Primitivism)", "New_Realism": "New Realism",
            "Northern_Renaissance": "Northern Renaissance", "Pointillism": "Pointillism", "Pop_Art": "Pop Art",
            "Post_Impressionism": "Post-Impressionism", "Realism": "Realism", "Rococo": "Rococo",
            "Romanticism": "Romanticism", "Symbolism": "Symbolism", "Synthetic_Cubism": "Synthetic Cubism",
            "Ukiyo_e": "Ukiyo-e",
        },
        "genre": {
            "abstract_painting": "abstract painting", "cityscape": "cityscape", "genre_painting": "genre painting",
            "illustration": "illustration", "landscape": "landscape", "nude_painting": "nude painting",
            "portrait": "portrait", "religious_painting": "religious painting",
            "sketch_and_study": "sketch and study", "still_life": "still life",
        },
    },
    "apy": {
        "category": {
            "aeroplane": "airplane", "bicycle": "bicycle", "bird": "bird", "boat": "boat", "bottle": "bottle",
            "bus": "bus", "car": "car", "cat": "cat", "chair": "chair", "cow": "cow",
            "diningtable": "dining table", "dog": "dog", "horse": "horse", "motorbike": "motorbike",
            "person": "person", "pottedplant": "potted plant", "sheep": "sheep", "sofa": "sofa",
            "train": "train", "tvmonitor": "tv monitor", "donkey": "donkey", "monkey": "monkey", "goat": "goat",
            "wolf": "wolf", "jetski": "jet ski", "zebra": "zebra", "centaur": "centaur", "mug": "mug",
            "statue": "statue", "building": "building", "bag": "bag", "carriage": "carriage",
        },
    },
    # CUB: 200 species; the rule of ``cub_phrase`` plus these exceptions (possessives and
    # names the rule would hyphenate wrongly)
    "cub": {"bird": {
        "Chuck_will_Widow": "Chuck-will's-widow", "Brandt_Cormorant": "Brandt's Cormorant",
        "Heermann_Gull": "Heermann's Gull", "Anna_Hummingbird": "Anna's Hummingbird",
        "Clark_Nutcracker": "Clark's Nutcracker", "Scott_Oriole": "Scott's Oriole",
        "Baird_Sparrow": "Baird's Sparrow", "Brewer_Sparrow": "Brewer's Sparrow",
        "Harris_Sparrow": "Harris's Sparrow", "Henslow_Sparrow": "Henslow's Sparrow",
        "Le_Conte_Sparrow": "Le Conte's Sparrow", "Lincoln_Sparrow": "Lincoln's Sparrow",
        "Nelson_Sharp_tailed_Sparrow": "Nelson's Sharp-tailed Sparrow", "Forsters_Tern": "Forster's Tern",
        "Brewer_Blackbird": "Brewer's Blackbird", "Wilson_Warbler": "Wilson's Warbler",
        "Swainson_Warbler": "Swainson's Warbler", "Bewick_Wren": "Bewick's Wren",
    }},
}


class ConditionTextError(ValueError):
    """A label that cannot be turned into condition text (unknown, or holding a placeholder)."""


def cub_phrase(name: str) -> str:
    """CUB folder name -> species: drop the ``NNN.`` prefix; an underscore before a lower-case
    word is a hyphen (``Black_footed`` -> ``Black-footed``), any other a space.

    >>> cub_phrase("001.Black_footed_Albatross"), cub_phrase("017.Cardinal")
    ('Black-footed Albatross', 'Cardinal')
    """
    bare = re.sub(r"^\d+\.", "", name)
    if bare in PHRASES["cub"]["bird"]:
        return PHRASES["cub"]["bird"][bare]
    return re.sub(r"_(?=[a-z])", "-", bare).replace("_", " ")


def phrase(dataset: str, prop: str, label: str) -> str:
    """The readable phrase of ``label``; datasets without a table get underscores as spaces."""
    if dataset == "cub" and prop == "bird":
        out = cub_phrase(label)
    else:
        table = PHRASES.get(dataset, {}).get(prop)
        if table is not None and label not in table:
            raise ConditionTextError(f"{dataset}.{prop}: no phrase for label {label!r}; add it to "
                                     "baselines/condition_text.py PHRASES")
        out = table[label] if table is not None else label.replace("_", " ")
    if "$" in out or "*" in out:  # the pseudo-token placeholders of SEARLE and Pic2Word
        raise ConditionTextError(f"{dataset}.{prop}: label {label!r} holds a placeholder character ($ or *)")
    return out


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def condition_text(dataset: str, conditions: Sequence[tuple[str, str]], template: str = "T1") -> str:
    """T for a list of (property, label) conditions, joined with " and "."""
    if template not in TEMPLATES:
        raise ConditionTextError(f"unknown template {template!r}; one of {', '.join(TEMPLATES)}")
    parts = []
    for prop, label in conditions:
        x = phrase(dataset, prop, label)
        kind = KINDS.get((dataset, prop), "category")
        parts.append(FORMS[kind][template].format(X=x, a=_article(x)))
    return " and ".join(parts)


def label_text(dataset: str, conditions: Sequence[tuple[str, str]]) -> str:
    """The text-only reference prompt: ``a photo of {labels}`` (template-independent)."""
    return "a photo of " + " and ".join(phrase(dataset, p, label) for p, label in conditions)


def word_text(dataset: str, conditions: Sequence[tuple[str, str]]) -> str:
    """The bare label phrases, space-joined (template-independent): FreeDom's text, the target
    domain's word ("cartoon") that it appends to the words found around the image."""
    return " ".join(phrase(dataset, p, label) for p, label in conditions)
