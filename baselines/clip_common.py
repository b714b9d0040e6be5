"""Shared CLIP pieces for CLIP4CIR, Pic2Word, SEARLE and the CLIP references (open_clip).

- ``build_clip``: an OpenAI-format state dict -> ``open_clip.CLIP`` in float32 with QuickGELU,
  architecture read off the tensors' shapes, strict load (bit-exact; open_clip's own
  ``build_model_from_openai_state_dict`` rounds through fp16).
- ``encode_text_with_pseudo_tokens``: ``CLIP.encode_text`` with the placeholder token's
  embedding replaced, per row, by a predicted pseudo-word (Pic2Word ``*``, SEARLE ``$``).
- ``clip_transform`` / ``targetpad_transform``: the baselines' preprocessing.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from cir_bench.registry import import_extra
from cir_bench_baselines.base import BadWeightsError, QueryComposer, strict_load

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
NON_PARAMETERS = ("input_resolution", "context_length", "vocab_size")  # extra keys of OpenAI files


def strip_prefix(state: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """DataParallel/DDP checkpoints prefix every key with ``module.``."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def clip_config(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """embed_dim, vision_cfg, text_cfg of the OpenAI CLIP that ``state`` belongs to."""
    try:
        if "visual.proj" in state:  # ViT
            width = state["visual.conv1.weight"].shape[0]
            patch = state["visual.conv1.weight"].shape[-1]
            grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
            layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
            vision = {"image_size": patch * grid, "layers": layers, "width": width, "patch_size": patch}
        else:  # ModifiedResNet
            counts = [len({k.split(".")[2] for k in state if k.startswith(f"visual.layer{b}.")}) for b in (1, 2, 3, 4)]
            width = state["visual.layer1.0.conv1.weight"].shape[0]
            grid = round((state["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
            vision = {"image_size": grid * 32, "layers": counts, "width": width, "patch_size": None}
        text_width = state["ln_final.weight"].shape[0]
        text = {"context_length": state["positional_embedding"].shape[0],
                "vocab_size": state["token_embedding.weight"].shape[0], "width": text_width,
                "heads": max(1, text_width // 64),
                "layers": len({k.split(".")[2] for k in state if k.startswith("transformer.resblocks.")})}
        return {"embed_dim": state["text_projection"].shape[1], "vision_cfg": vision, "text_cfg": text}
    except KeyError as err:
        raise BadWeightsError(f"not an OpenAI-format CLIP state dict (no key {err})") from None


def build_clip(state: dict[str, torch.Tensor], what: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """``open_clip.CLIP`` holding ``state`` exactly (float32, QuickGELU as OpenAI trained it)."""
    open_clip = import_extra("open_clip", "baselines", "the CLIP baselines")

    # drop the OpenAI files' extra entries and the causal mask a traced model may carry (derived, not learnt)
    state = {k: v for k, v in strip_prefix(state).items()
             if k not in NON_PARAMETERS and k.split(".")[-1] != "attn_mask"}
    cfg = clip_config(state)
    model = open_clip.CLIP(cfg["embed_dim"], vision_cfg=open_clip.CLIPVisionCfg(**cfg["vision_cfg"]),
                           text_cfg=open_clip.CLIPTextCfg(**cfg["text_cfg"]), quick_gelu=True)
    strict_load(model, state, what)
    return model.eval(), cfg


def architecture_note(cfg: dict[str, Any], expected: str) -> str | None:
    """None when ``cfg`` is the authors' architecture ``expected`` (an open_clip model name),
    else a note for the results (e.g. tiny test weights)."""
    open_clip = import_extra("open_clip", "baselines", "the CLIP baselines")

    ref = open_clip.get_model_config(expected)
    same = (cfg["embed_dim"] == ref["embed_dim"]
            and all(cfg["vision_cfg"][k] == (list(v) if isinstance(v, tuple) else v)
                    for k, v in ref["vision_cfg"].items() if k in cfg["vision_cfg"])
            and all(cfg["text_cfg"][k] == v for k, v in ref["text_cfg"].items() if k in cfg["text_cfg"]))
    if same:
        return None
    params = f"embed {cfg['embed_dim']}, vision {cfg['vision_cfg']}, text width {cfg['text_cfg']['width']}"
    return f"not the authors' {expected} ({params}): numbers are not the baseline's"


def tokenizer():
    """open_clip's BPE tokenizer (its vocabulary ships in the wheel; nothing is fetched)."""
    open_clip = import_extra("open_clip", "baselines", "the CLIP baselines")

    return open_clip.get_tokenizer("ViT-B-32")


def placeholder_id(tok, placeholder: str) -> int:
    ids = tok([placeholder])[0]
    if int(ids[2]) != tok.eot_token_id:
        raise ValueError(f"placeholder {placeholder!r} is not a single BPE token")
    return int(ids[1])


def encode_text_with_pseudo_tokens(clip: torch.nn.Module, tokens: torch.Tensor, pseudo: torch.Tensor,
                                   placeholder: int, first_only: bool = False) -> torch.Tensor:
    """``clip.encode_text(tokens)`` with the embedding of the placeholder token in row i
    replaced by ``pseudo[i]``; each row must hold the placeholder exactly once (``first_only``:
    at least once, and only the first is replaced, as SEARLE's OTI does in GPT phrases)."""
    text_global_pool = import_extra("open_clip.transformer", "baselines", "the CLIP baselines").text_global_pool

    where = tokens == placeholder
    counts = where.sum(dim=1)
    if first_only:
        where = where & (where.cumsum(dim=1) == 1)
        counts = where.sum(dim=1)
    if not bool((counts == 1).all()):
        bad = int(torch.nonzero(counts != 1)[0])
        raise ValueError(f"prompt {bad} holds the placeholder token {int(counts[bad])} times (needs exactly once"
                         f"{'; lost to truncation at the context length?' if first_only else ''})")
    cast = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast)
    x = torch.where(where[..., None], pseudo.to(cast)[:, None, :], x)
    x = x + clip.positional_embedding.to(cast)
    x = clip.transformer(x, attn_mask=clip.attn_mask)
    x = clip.ln_final(x)
    x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
    return x @ clip.text_projection


class TargetPad:
    """CLIP4CIR's pad-to-aspect-ratio: images more elongated than ``ratio`` are padded (black)
    to ``ratio`` before the resize, so the centre crop keeps most of them."""

    def __init__(self, ratio: float) -> None:
        self.ratio = ratio

    def __call__(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if max(w, h) / min(w, h) < self.ratio:
            return image
        scaled = max(w, h) / self.ratio
        hp, vp = max(int((scaled - w) / 2), 0), max(int((scaled - h) / 2), 0)
        out = Image.new(image.mode, (w + 2 * hp, h + 2 * vp))
        out.paste(image, (hp, vp))
        return out


def clip_transform(size: int, target_pad: float | None = None):
    """CLIP eval preprocessing (bicubic resize of the shorter side, centre crop, CLIP mean/std),
    optionally after TargetPad."""
    steps: list = [TargetPad(target_pad)] if target_pad else []
    # resize and crop on the PIL image, as CLIP's own preprocess does (PIL bicubic)
    steps += [lambda im: im.convert("RGB"), v2.Resize(size, interpolation=v2.InterpolationMode.BICUBIC),
              v2.CenterCrop(size), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
              v2.Normalize(CLIP_MEAN, CLIP_STD)]
    return v2.Compose(steps)


def stack(transform, images: Sequence[Image.Image]) -> torch.Tensor:
    return torch.stack([transform(im) for im in images])


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


class CLIPComposer(QueryComposer):
    """Shared by the CLIP-based adapters: one open_clip model (plus the method's own modules),
    CLIP preprocessing (``target_pad``: TargetPad ratio or None), the BPE tokenizer."""

    target_pad: float | None = None

    def __init__(self, clip: torch.nn.Module, image_size: int, device: str = "cpu", batch_size: int = 32,
                 modules: Sequence[torch.nn.Module] = ()) -> None:
        super().__init__(device, batch_size)
        self.clip = clip
        self.eval_mode(clip, *modules)
        self.image_size = image_size
        self.transform = clip_transform(image_size, self.target_pad)
        self.tokenizer = tokenizer()

    @property
    def embed_dim(self) -> int:
        return int(self.clip.text_projection.shape[1])

    def describe(self) -> dict[str, Any]:
        pad = f"targetpad{self.target_pad:g}-" if self.target_pad else ""
        return {**super().describe(), "preprocess": f"{pad}clip{self.image_size}"}

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return stack(self.transform, images)

    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(pixels)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """normalize(encode_text(text)) for each text as given (no prompt added), on the CPU."""
        out = [self.clip.encode_text(self.tokenizer(list(texts[sl])).to(self.device)).float()
               for sl in self._batches(len(texts))]
        return F.normalize(torch.cat(out), dim=-1).cpu() if out else torch.zeros(0, self.embed_dim)

    def finish(self, paths: dict, cfg: dict[str, Any], expected: str) -> "CLIPComposer":
        """Record the weights' provenance and note an architecture that is not the authors'."""
        self._record(paths)
        note = architecture_note(cfg, expected)
        if note:
            self.notes.append(note)
        return self
