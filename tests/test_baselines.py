"""CoIR baseline adapters built from tiny random modules of the real classes, saved in the
authors' checkpoint formats and loaded back through the real ``from_weights`` path."""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("open_clip")

from cir_bench_baselines import BASELINES, get_composer  # noqa: E402
from cir_bench_baselines.base import BadWeightsError, MissingWeightsError, load_restricted, load_state, \
    resolve_weights_root  # noqa: E402
from cir_bench_baselines.clip4cir import Combiner  # noqa: E402
from cir_bench_baselines.clip_common import encode_text_with_pseudo_tokens, placeholder_id, tokenizer  # noqa: E402
from cir_bench_baselines.condition_text import ConditionTextError, condition_text, label_text  # noqa: E402
from .tiny_weights import tiny_clip  # noqa: E402

NAMES = ["clip4cir", "pic2word", "searle", "searle-xl", "covr", "clip-image", "clip-text", "clip-sum"]


@pytest.fixture(scope="module")
def weights(tiny_weights):
    return tiny_weights


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((30 + 7 * i, 50, 3)) * 255).astype("uint8")) for i in range(5)]


@pytest.fixture(scope="module")
def composers(weights, no_network):
    return {name: get_composer(name, weights) for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_adapter_invariants(composers, images, name):
    c = composers[name]
    texts = ["is in flat style", "is red", "is a circle", "is in mosaic style", "is blue"]
    g = c.encode_gallery(images)
    q = c.encode_query(images, texts)
    assert g.dtype == q.dtype == torch.float32 and g.device.type == q.device.type == "cpu"
    assert g.shape == (5, c.embed_dim) and q.shape == (5, c.embed_dim)
    assert torch.allclose(g.norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.allclose(q.norm(dim=1), torch.ones(5), atol=1e-5)
    assert torch.equal(q, c.encode_query(images, texts))  # same batch, same process: dropout is off
    # batch invariant up to float32 rounding: unit vectors through a few transformer layers
    # (sums over ~10^2-10^3 terms) move by ~1e-6; 1e-4 leaves room for other CPUs' kernels
    singles = torch.cat([c.encode_query(images[i:i + 1], texts[i:i + 1]) for i in range(5)])
    assert float((q - singles).norm(dim=1).max()) <= 1e-4
    gallery_singles = torch.cat([c.encode_gallery(images[i:i + 1]) for i in range(5)])
    assert float((g - gallery_singles).norm(dim=1).max()) <= 1e-4
    assert c.score(q, g).shape == (5, 5)
    other = c.encode_query(images[:1], ["is in hatched style"])
    if name != "clip-image":  # the image-only reference ignores the condition by design
        assert not torch.allclose(other, q[:1]), "different conditions gave the same query"
    if name in ("pic2word", "searle", "searle-xl", "clip4cir", "covr", "clip-sum"):
        moved = c.encode_query(images[1:2], texts[:1])
        assert not torch.allclose(moved, q[:1]), "a different image gave the same query"
    assert c.notes and "not the authors'" in c.notes[0]  # tiny weights are labelled as such
    assert all(len(v["sha256"]) == 64 for v in c.weights.values())


def test_pseudo_token_encoder_equals_encode_text_with_the_placeholder_embedding():
    clip = tiny_clip("vit", 7)
    tok = tokenizer()
    for placeholder, prompt in (("$", "a photo of $ that is red"), ("*", "a photo of * , is in flat style")):
        pid = placeholder_id(tok, placeholder)
        tokens = tok([prompt, prompt.replace("red", "blue").replace("flat", "dotted")])
        own = clip.token_embedding.weight[pid].expand(2, -1)
        with torch.no_grad():  # the same graph through another entry point: equal up to rounding
            ours, theirs = encode_text_with_pseudo_tokens(clip, tokens, own, pid), clip.encode_text(tokens)
        assert ours.shape == theirs.shape
        assert float((ours - theirs).abs().max()) <= 1e-5 * float(theirs.abs().max())
    assert (placeholder_id(tok, "$"), placeholder_id(tok, "*")) == (259, 265)  # the authors' BPE ids


def test_placeholder_must_appear_exactly_once():
    clip, tok = tiny_clip("vit", 1), tokenizer()
    tokens = tok(["a photo of $ and $", "a photo of $"])
    with pytest.raises(ValueError, match="prompt 0 holds the placeholder token 2 times"):
        encode_text_with_pseudo_tokens(clip, tokens, torch.zeros(2, 64), 259)


def test_combiner_matches_the_formula():
    torch.manual_seed(0)
    comb = Combiner(8, 6, 10).eval()
    img, txt = torch.randn(3, 8), torch.randn(3, 8)
    with torch.no_grad():
        tp = torch.relu(comb.text_projection_layer(txt))
        ip = torch.relu(comb.image_projection_layer(img))
        raw = torch.cat([tp, ip], -1)
        lam = torch.sigmoid(comb.dynamic_scalar[3](torch.relu(comb.dynamic_scalar[0](raw))))
        expected = comb.output_layer(torch.relu(comb.combiner_layer(raw))) + lam * txt + (1 - lam) * img
        assert torch.allclose(comb.combine_features(img, txt), torch.nn.functional.normalize(expected, dim=-1))
    assert set(comb.state_dict()) >= {"dynamic_scalar.0.weight", "dynamic_scalar.3.weight", "output_layer.bias"}


def test_condition_text_templates_and_prompts(composers):
    conds = [("style", "hatched"), ("color", "red")]
    assert condition_text("synthart", conds, "T1") == "is in hatched style and is red"
    assert condition_text("synthart", conds, "T2") == "make it in hatched style and make it red"
    assert condition_text("synthart", conds, "T3") == "hatched and red"
    assert condition_text("synthart", [("shape", "hexagon")], "T1") == "is a hexagon"
    assert condition_text("apy", [("category", "aeroplane")], "T2") == "change it to an airplane"
    assert condition_text("wikiart", [("style", "Ukiyo_e")], "T1") == "is in Ukiyo-e style"
    assert label_text("cub", [("bird", "017.Cardinal")]) == "a photo of Cardinal"
    assert composers["searle"].prompts(["is red"]) == ["a photo of $ that is red"]
    assert composers["pic2word"].prompts(["is red"]) == ["a photo of * , is red"]
    assert composers["clip4cir"].prompts(["is red"]) == ["is red"]
    with pytest.raises(ConditionTextError, match="no phrase for label 'Rococo'"):
        condition_text("synthart", [("style", "Rococo")])
    with pytest.raises(ConditionTextError, match="placeholder"):
        condition_text("csv", [("tag", "a$b")])
    with pytest.raises(ConditionTextError, match="unknown template"):
        condition_text("synthart", conds, "T9")


def test_missing_weights_name_each_path_source_and_licence(tmp_path, monkeypatch):
    monkeypatch.setenv("CIR_BENCH_WEIGHTS", str(tmp_path))
    root, how = resolve_weights_root()
    assert root == tmp_path and how == "$CIR_BENCH_WEIGHTS"
    with pytest.raises(MissingWeightsError) as err:
        get_composer("searle")
    msg = str(err.value)
    assert str(tmp_path / "searle" / "SEARLE_ViT-B32.pt") in msg and str(tmp_path / "clip" / "ViT-B-32.pt") in msg
    assert "CC BY-NC 4.0" in msg and "miccunifi/SEARLE" in msg and "$CIR_BENCH_WEIGHTS" in msg
    assert "open_clip_model.safetensors" in msg  # the accepted alternative is named too
    with pytest.raises(MissingWeightsError, match="ABaldrati/CLIP4Cir"):
        get_composer("clip4cir", tmp_path)


def test_html_truncated_and_misshapen_files_are_refused(tmp_path, weights):
    html = tmp_path / "clip4cir" / "cirr_clip_RN50x4_fullft.pt"
    html.parent.mkdir(parents=True)
    html.write_text("<!DOCTYPE html><html>Google Drive - Virus scan warning</html>" * 100)
    with pytest.raises(BadWeightsError, match="HTML"):
        load_state(html)
    (html.parent / "cirr_comb_RN50x4_fullft.pt").write_bytes(b"x" * 4096)
    with pytest.raises(BadWeightsError, match=r"(?s)HTML.*get it again from: Google Drive folder .*ABaldrati"):
        get_composer("clip4cir", tmp_path)  # the adapter's error says where to fetch the file again
    good = weights / "searle" / "SEARLE_ViT-B32.pt"
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(BadWeightsError, match="truncated|damaged"):
        load_state(cut)
    # a Phi of the wrong shape: the strict load names the keys/shapes
    bad_root = tmp_path / "w"
    (bad_root / "searle").mkdir(parents=True)
    (bad_root / "clip").mkdir()
    (bad_root / "clip" / "ViT-B-32.pt").write_bytes((weights / "clip" / "ViT-B-32.pt").read_bytes())
    state = torch.load(good, weights_only=True)["Phi"]
    state["layers.3.weight"] = torch.zeros(5, 5)
    torch.save({"Phi": state}, bad_root / "searle" / "SEARLE_ViT-B32.pt")
    with pytest.raises(BadWeightsError, match=r"layers\.3\.weight: file \(5, 5\)"):
        get_composer("searle", bad_root)
    # the wrong dictionary layout names the expected format
    torch.save({"state_dict": state}, bad_root / "searle" / "SEARLE_ViT-B32.pt")
    with pytest.raises(BadWeightsError, match="'Phi'"):
        get_composer("searle", bad_root)


class _Scheduler:
    def __init__(self):
        self.lr = 0.1


def _with_fake_module(module_name: str, cls: type, save) -> None:
    """``save()`` while ``module_name`` exists (as the authors' code does when they save), then
    forget it: the loader must not need it."""
    parts = module_name.split(".")
    fake = {".".join(parts[:i]): types.ModuleType(".".join(parts[:i])) for i in range(1, len(parts) + 1)}
    cls.__module__ = module_name
    setattr(fake[module_name], cls.__name__, cls)
    saved = {k: sys.modules.get(k) for k in fake}
    sys.modules.update(fake)
    try:
        save()
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


def _evil_checkpoint(path, command: str) -> None:
    """A torch zip checkpoint whose data.pkl calls torch._utils._import_dotted_name("os.system")
    and then that function with ``command`` (the attack the old unpickler let through)."""
    import zipfile

    base = path.with_suffix(".base")
    torch.save({"model": {"w": torch.zeros(600)}}, base)

    def text(s: str) -> bytes:
        return b"X" + len(s).to_bytes(4, "little") + s.encode()

    payload = (b"\x80\x02ctorch._utils\n_import_dotted_name\n" + text("os.system") + b"\x85R"
               + text(command) + b"\x85R.")
    with zipfile.ZipFile(base) as zin, zipfile.ZipFile(path, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, payload if info.filename.endswith("data.pkl") else zin.read(info.filename))
    base.unlink()


def test_checkpoints_load_weights_only_with_the_formats_own_classes_as_stubs(tmp_path):
    from cir_bench_baselines.base import UnsafeWeightsError, WeightsFile

    # a Lightning-style checkpoint holding the authors' src.tools.scheduler.CosineSchedule
    _Scheduler.__qualname__ = _Scheduler.__name__ = "CosineSchedule"
    path = tmp_path / "webvid-covr.ckpt"
    _with_fake_module("src.tools.scheduler", _Scheduler, lambda: torch.save(
        {"epoch": 1, "model": {"w": torch.ones(3)}, "scheduler": _Scheduler()}, path))
    with pytest.raises(UnsafeWeightsError, match="src.tools.scheduler.CosineSchedule") as err:
        load_state(path)  # no format declared it
    assert err.value.refused == ("src.tools.scheduler.CosineSchedule",) and err.value.path == path
    spec = WeightsFile("covr/webvid-covr.ckpt", "test", "MIT", pickled_classes=("src.tools.scheduler.CosineSchedule",))
    ckpt = load_restricted(path, spec)
    assert torch.equal(ckpt["model"]["w"], torch.ones(3))
    assert type(ckpt["scheduler"]).__name__ == "CosineSchedule" and not hasattr(ckpt["scheduler"], "lr")
    # another class of the same module is not in the allow-list: refused, named
    _Scheduler.__qualname__ = _Scheduler.__name__ = "Other"
    other = tmp_path / "other.ckpt"
    _with_fake_module("src.tools.scheduler", _Scheduler, lambda: torch.save({"x": _Scheduler()}, other))
    with pytest.raises(UnsafeWeightsError, match="src.tools.scheduler.Other"):
        load_restricted(other, spec)


def test_a_checkpoint_that_runs_code_is_refused_before_anything_runs(tmp_path, monkeypatch, capsys):
    from cir_bench_baselines.base import UnsafeWeightsError, WeightsFile
    from cir_bench.cli import main

    marker = tmp_path / "pwned"
    root = tmp_path / "weights"
    (root / "covr" / "bert-base-uncased").mkdir(parents=True)
    (root / "covr" / "bert-base-uncased" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    evil = root / "covr" / "webvid-covr.ckpt"
    _evil_checkpoint(evil, f"touch {marker}")
    spec = WeightsFile("covr/webvid-covr.ckpt", "test", "MIT", min_bytes=16,
                       pickled_classes=("src.tools.scheduler.CosineSchedule",))
    for load in (lambda: load_restricted(evil, spec), lambda: load_state(evil)):
        with pytest.raises(UnsafeWeightsError, match="torch._utils._import_dotted_name") as err:
            load()
        assert err.value.refused == ("torch._utils._import_dotted_name",)
        assert not marker.exists()
    # the attack as it came: a plain `cir-bench check-weights --baselines covr`
    assert main(["check-weights", "--weights-dir", str(root), "--baselines", "covr", "--no-hash"]) == 1
    out = capsys.readouterr().out
    assert "covr: DAMAGED" in out and "torch._utils._import_dotted_name" in out and str(evil) in out
    assert not marker.exists()
    # a legacy (non-zip) pickle asking for os.system: the weights-only unpickler refuses it
    legacy = tmp_path / "legacy.pt"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    torch.save({"w": torch.zeros(600), "x": Evil()}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeWeightsError):
        load_restricted(legacy)
    assert not marker.exists()


def test_covr_query_path_swaps_cls_for_enc_and_cross_attends(composers, images):
    from cir_bench_baselines.covr import blip_to_hf, hf_to_blip

    c = composers["covr"]
    seen = {}
    real_forward = c.model.text_encoder.forward

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_forward(*args, **kwargs)

    c.model.text_encoder.forward = spy
    try:
        c.encode_query(images[:2], ["is red", "make it in flat style"])
    finally:
        c.model.text_encoder.forward = real_forward
    assert (seen["input_ids"][:, 0] == c.tokenizer.convert_tokens_to_ids("[ENC]")).all()
    assert c.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [len(c.tokenizer) - 2, len(c.tokenizer) - 1]
    assert seen["encoder_hidden_states"].shape[:2] == (2, 5)  # all ViT tokens of the reference (CLS + 2x2)
    for key in c.model.state_dict():
        assert blip_to_hf(hf_to_blip(key)) == key
    assert hf_to_blip("vision_model.encoder.layers.0.self_attn.projection.weight") == "visual_encoder.blocks.0.attn.proj.weight"
    assert hf_to_blip("vision_model.post_layernorm.bias") == "visual_encoder.norm.bias"


def test_covr_refuses_a_file_that_is_not_a_bert_vocabulary(weights, tmp_path):
    import shutil

    shutil.copytree(weights / "covr", tmp_path / "covr")
    (tmp_path / "covr" / "bert-base-uncased" / "vocab.txt").write_text("hello\nworld\n" * 10)
    with pytest.raises(BadWeightsError, match=r"no \[PAD\] line"):
        get_composer("covr", tmp_path)


def test_condition_text_gives_the_exact_prompts_per_query(composers):
    conds = [[("style", "hatched"), ("color", "red")], [("style", "flat"), ("color", "blue")]]
    assert composers["searle"].condition_text("synthart", conds, "T2") == [
        "a photo of $ that make it in hatched style and make it red",
        "a photo of $ that make it in flat style and make it blue"]
    assert composers["pic2word"].condition_text("synthart", conds[:1], "T3") == ["a photo of * , hatched and red"]
    assert composers["covr"].condition_text("synthart", conds[:1]) == ["is in hatched style and is red"]
    assert composers["clip-text"].condition_text("synthart", conds[:1], "T2") == ["a photo of hatched and red"]


def test_from_modules_runs_the_same_forward_code_as_from_weights(composers, weights, images):
    from cir_bench_baselines.clip_common import build_clip
    from cir_bench_baselines.searle import SEARLE, Phi

    clip, cfg = build_clip(load_state(weights / "clip" / "ViT-B-32.pt"), "clip")
    state = load_state(weights / "searle" / "SEARLE_ViT-B32.pt")["Phi"]
    phi = Phi(*Phi.dims(state))
    phi.load_state_dict(state)
    built = SEARLE.from_modules(clip, phi, cfg["vision_cfg"]["image_size"])
    texts = ["is red", "is in flat style"]
    assert torch.equal(built.encode_query(images[:2], texts), composers["searle"].encode_query(images[:2], texts))
    assert not built.weights  # nothing was read from disk


def test_registry_lists_every_adapter():
    assert set(NAMES) <= set(BASELINES.names())


REAL = {name: BASELINES.get(name).required_files() for name in NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_real_weights_when_present(name):
    """Runs only where the authors' files are on disk ($CIR_BENCH_WEIGHTS or ~/.cache/cir-bench/weights)."""
    from .conftest import USER_WEIGHTS_ROOT

    root = USER_WEIGHTS_ROOT
    missing = [f.path for f in REAL[name] if f.find(root) is None]
    if missing:
        pytest.skip(f"real weights absent: {', '.join(str(root / m) for m in missing)}")
    c = get_composer(name, root)
    assert not c.notes, c.notes  # the real files have the authors' architecture
    img = Image.new("RGB", (300, 200), (200, 30, 30))
    q = c.encode_query([img], ["is red"])
    assert q.shape == (1, c.embed_dim) and torch.isfinite(q).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_adapter_on_cuda_matches_cpu(composers, weights, images, name):
    gpu = get_composer(name, weights, device="cuda")
    assert next(gpu.clip.parameters() if hasattr(gpu, "clip") else gpu.model.parameters()).device.type == "cuda"
    texts = ["is in flat style", "is red", "is a circle", "is in mosaic style", "is blue"]
    q_gpu, g_gpu = gpu.encode_query(images, texts), gpu.encode_gallery(images)
    assert q_gpu.device.type == "cpu" and q_gpu.dtype == torch.float32  # outputs come back as CPU float32
    assert torch.allclose(q_gpu, composers[name].encode_query(images, texts), atol=2e-3)
    assert torch.allclose(g_gpu, composers[name].encode_gallery(images), atol=2e-3)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_clip_backbone_from_torchscript_and_safetensors_files(tmp_path, images):
    """OpenAI ships CLIP as TorchScript archives, open_clip's hub copies as safetensors: both load
    bit-exactly into the same open_clip model (here for a tiny CLIP)."""
    from safetensors.torch import save_file

    from cir_bench_baselines.clip_common import build_clip

    model = tiny_clip("vit", 3)
    pixels = torch.randn(2, 3, 32, 32)
    tokens = torch.randint(0, 49408, (2, 77))
    traced = torch.jit.trace(model, (pixels, tokens), check_trace=False)
    torch.jit.save(traced, tmp_path / "ViT-B-32.pt")
    (tmp_path / "ViT-B-32").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(tmp_path / "ViT-B-32" / "open_clip_model.safetensors"))
    for path in (tmp_path / "ViT-B-32.pt", tmp_path / "ViT-B-32" / "open_clip_model.safetensors"):
        clip, _ = build_clip(load_state(path), str(path))
        with torch.no_grad():
            assert torch.equal(clip.encode_image(pixels), model.encode_image(pixels))
            assert torch.equal(clip.encode_text(tokens), model.encode_text(tokens))
