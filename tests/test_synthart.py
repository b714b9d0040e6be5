from __future__ import annotations

import numpy as np
import pytest

from cir_bench.data import get_dataset
from cir_bench.data.synthart import (BACKGROUNDS, COLORS, PRESETS, SHAPES, STYLES, SynthArt, generate,
                                     sample_scenes)


def test_generation_is_deterministic():
    p = PRESETS["tiny"]
    a, b = generate(p), generate(p)
    cols = ["id", "split", "style", "shape", "color", "background", "size", "cell", "noise_sigma", "jpeg_quality"]
    assert a[cols].equals(b[cols])
    assert list(a["tags"].map(tuple)) == list(b["tags"].map(tuple))
    # same library versions in one process: the pixels agree too
    assert (a["image"] == b["image"]).all()


def test_worker_count_does_not_change_the_set():
    from dataclasses import replace

    p = replace(PRESETS["tiny"], n_scenes=120)  # >= 100 scenes takes the process-pool path
    a, b = generate(replace(p, workers=1)), generate(replace(p, workers=2))
    assert a.drop(columns="image").equals(b.drop(columns="image"))
    assert (a["image"] == b["image"]).all()


def test_different_seed_gives_different_scenes():
    from dataclasses import replace

    a = sample_scenes(PRESETS["tiny"])
    b = sample_scenes(replace(PRESETS["tiny"], seed=1))
    assert [s["shape"] for s in a] != [s["shape"] for s in b]


def test_labels_tags_and_factors_agree(tiny):
    assert [p.name for p in tiny.properties] == ["style", "shape", "color"]
    assert [p.num_classes for p in tiny.properties] == [6, 8, 8]
    for it in tiny.items:
        style, shape, color = (tiny.property(n).classes[it.labels[n]] for n in ("style", "shape", "color"))
        assert {f"style:{style}", f"shape:{shape}", f"color:{color}"} <= it.tags
        assert it.factors["style"] == style and it.factors["shape"] == shape and it.factors["color"] == color
        assert f"bg:{it.factors['background']}" in it.tags
        assert f"size:{it.factors['size']}" in it.tags and f"cell:{it.factors['cell']}" in it.tags
        assert it.factors["background"] in BACKGROUNDS
        n_obj = [t for t in it.tags if t.startswith("n_objects:")]
        assert len(n_obj) == 1 and 1 <= int(n_obj[0].split(":")[1]) <= 3
    img = tiny.load_image(0)
    assert img.mode == "RGB" and img.size == (64, 64)


def test_scene_groups_hold_exact_counterfactual_twins(tiny):
    groups: dict[str, list] = {}
    for it in tiny.items:
        groups.setdefault(it.group, []).append(it)
    assert len(groups) == PRESETS["tiny"].n_scenes
    n_interventions = 0
    for members in groups.values():
        assert len({m.split for m in members}) == 1  # twins never straddle the split
        base = [m for m in members if "-shape-" not in m.id and "-color-" not in m.id]
        assert len(base) == 3 and len({m.factors["style"] for m in base}) == 3
        for m in base[1:]:  # style renders: only the style differs
            diff = {f for f in m.factors if m.factors[f] != base[0].factors[f]}
            assert diff == {"style"}
        for m in members:
            if "-shape-" in m.id or "-color-" in m.id:
                n_interventions += 1
                ref = next(b for b in base if b.factors["style"] == m.factors["style"])
                diff = {f for f in m.factors if m.factors[f] != ref.factors[f]}
                assert diff == {"shape" if "-shape-" in m.id else "color"}
    assert n_interventions > 0


def test_default_preset_size_and_splits():
    p = PRESETS["default"]
    assert p.image_size == 128
    n = p.n_scenes * p.styles_per_scene
    assert n >= 1000  # the issue asks for >= 1,000 images in the demo preset


def test_every_factor_value_occurs(tiny):
    frame = tiny.to_frame()
    assert set(frame["style"]) == set(STYLES)
    assert set(frame["shape"]) == set(SHAPES)
    assert set(frame["color"]) == set(COLORS)


def test_unknown_preset_and_option_are_clear_errors(cache_dir):
    with pytest.raises(ValueError, match="unknown SynthArt preset 'huge'"):
        SynthArt.load("huge", cache_dir=cache_dir)
    with pytest.raises(ValueError, match="unknown SynthArt option"):
        SynthArt.load("tiny", cache_dir=cache_dir, n_scene=3)


def test_registry_builds_synthart_and_caches(cache_dir, tiny):
    again = get_dataset("synthart", None, {"preset": "tiny"}, cache_dir)
    assert again.fingerprint() == tiny.fingerprint()
    assert np.array_equal(np.asarray(again.load_image(5)), np.asarray(tiny.load_image(5)))


def test_corrupt_image_bytes_raise_a_clear_error():
    import io

    from PIL import Image

    from cir_bench.data.base import BadImageError, decode_image

    with pytest.raises(BadImageError, match="cannot decode image item-7"):
        decode_image(b"\xff\xd8 not a jpeg", "item-7")
    buf = io.BytesIO()
    Image.new("L", (4, 4), 128).save(buf, format="PNG")  # grayscale -> RGB
    assert decode_image(buf.getvalue(), "gray").mode == "RGB"
    buf = io.BytesIO()
    Image.new("CMYK", (4, 4)).save(buf, format="JPEG")
    assert decode_image(buf.getvalue(), "cmyk").mode == "RGB"
