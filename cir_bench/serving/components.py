"""The four components of the search service, framework-free. The Ray Serve app
(serve/app.py) deploys each separately; ``SearchService`` composes them in one process. Both
run them through the same orchestration (cir_bench.serving.orchestrate).

    EncoderStage   uploaded image bytes -> z0                    (the model's backbone+encoder)
    TeacherStage  (z0, condition) -> z by Backward Search        (the model's heads)
    StudentStage  (z0, condition) -> z in one forward pass       (the distilled students)
    IndexStage    z -> top-k item ids and scores; z0 of an item  (the embedding store)

Each component loads its own part from the files named by a ``ServeBundle`` (checkpoint,
embedding store, students), so a deployment holds only what it needs. On a multi-node
cluster the cache folder holding those files must be on a shared filesystem.
"""
from __future__ import annotations

import time

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from cir_bench.config import SearchConfig
from cir_bench.data.base import decode_image
from cir_bench.data.transforms import build_transform
from cir_bench.serving.jobs import Ranked, RankJob, Searched, SearchJob
from cir_bench.serving.requests import Catalog


@dataclass(frozen=True)
class TransformSpec:
    """The model's eval preprocessing (``build_transform``'s arguments)."""

    input_size: Any  # int, or (height, width)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    square: bool = False


@dataclass(frozen=True)
class DatasetSpec:
    """Where the search page reads item images from (the dataset's loader), and the fingerprint
    the dataset must still have."""

    name: str
    root: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    cache_dir: str | None = None
    fingerprint: str = ""


@dataclass
class ServeBundle:
    """The files and settings the components are built from (what ``build_bundle`` writes)."""

    catalog: Catalog
    checkpoint: str
    store: str
    students: dict[tuple[str, ...], str]
    transform: TransformSpec
    search: SearchConfig  # the run config's Backward Search section (the teacher)
    index: str = "exact"
    index_options: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    dataset: DatasetSpec | None = None  # the search page's images; None: the bundle serves no images


def build_bundle(cfg, progress: bool = False, dataset=None) -> ServeBundle:
    """Train or load everything a run config names (the cache makes that a load), distil or
    load one student per query set, and return the files the components load."""
    from cir_bench.models import BACKBONES
    from cir_bench.pipeline import cache_dir_for, distil_or_load, prepare, query_sets
    from cir_bench.embed import store_path
    from cir_bench.train.trainer import resolve_input_size

    prepared = prepare(cfg, progress=progress, dataset=dataset)
    ds = prepared.dataset
    students = {}
    for props, _, _ in query_sets(cfg, ds, log=lambda *_: None):
        _, info = distil_or_load(cfg, ds, prepared.trained, prepared.store, list(props), prepared.device,
                                 progress=progress)
        students[tuple(props)] = info["path"]
    spec = BACKBONES.get(cfg.model.backbone)
    return ServeBundle(
        catalog=Catalog.from_dataset(ds, prepared.ctx.database, cfg.eval.self_match),
        checkpoint=str(prepared.trained.checkpoint),
        store=str(store_path(cache_dir_for(cfg), prepared.store.fingerprint)),
        students=students,
        transform=TransformSpec(resolve_input_size(cfg.model, ds), tuple(spec.mean), tuple(spec.std), ds.square_resize),
        search=cfg.search.model_copy(deep=True),
        index=cfg.eval.index, index_options={"chunk": cfg.eval.search_batch, **cfg.eval.index_options},
        device=str(prepared.device),
        dataset=DatasetSpec(cfg.dataset.name, cfg.dataset.root, dict(cfg.dataset.options), str(cache_dir_for(cfg)),
                            ds.fingerprint()),
    )


class ItemImages:
    """Item images for the search page, read through the dataset's loader (SynthArt renders
    them), opened on first use; thumbnails are JPEG, memoised per (item, size)."""

    SIZES = (64, 128, 256, 512)

    def __init__(self, bundle: ServeBundle, max_cached: int = 4096) -> None:
        self.spec, self.catalog, self._dataset = bundle.dataset, bundle.catalog, None
        self._cache: dict[tuple[str, int], bytes] = {}
        self.max_cached = max_cached

    def dataset(self):
        if self._dataset is None:
            from cir_bench.data import get_dataset

            spec = self.spec
            if spec is None:
                raise RuntimeError("this bundle names no dataset: it serves no item images")
            ds = get_dataset(spec.name, spec.root, spec.options, spec.cache_dir)
            if spec.fingerprint and ds.fingerprint() != spec.fingerprint:
                raise RuntimeError(f"the dataset '{spec.name}' on disk differs from the one served (fingerprint)")
            self._dataset = ds
        return self._dataset

    def jpeg(self, item_id: str, size: int) -> bytes:
        """The item's image, its longer side at most ``size`` px (one of SIZES); KeyError for
        an id the catalog does not hold."""
        import io

        self.catalog.position(item_id)  # KeyError for an unknown id, before touching the dataset
        key = (item_id, int(size))
        if key not in self._cache:
            ds = self.dataset()
            img = ds.load_image(ds.index_of(item_id)).convert("RGB")
            img.thumbnail((size, size))
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=88)
            if len(self._cache) >= self.max_cached:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = buf.getvalue()
        return self._cache[key]


# -- the four components ----------------------------------------------------------------------
class EncoderStage:
    """Uploaded image bytes -> z0 (eval mode, one batch per call)."""

    def __init__(self, bundle: ServeBundle, device: str | None = None) -> None:
        from cir_bench.models import load_checkpoint

        self.device = torch.device(device or bundle.device)
        self.model, _ = load_checkpoint(bundle.checkpoint, self.device)
        spec = bundle.transform
        self.transform = build_transform(spec.input_size, spec.mean, spec.std, square=spec.square)
        size = spec.input_size
        # a large JPEG decoded at 1/2..1/8 scale, still twice the model's input on each side
        self.draft = 2 * int(max(size) if isinstance(size, (list, tuple)) else size)

    @torch.no_grad()
    def embed(self, images: Sequence[bytes]) -> np.ndarray:
        x = torch.stack([self.transform(decode_image(b, "upload", draft=self.draft)) for b in images]
                        ).to(self.device)
        return self.model.embed(x).float().cpu().numpy()


def _groups(jobs: Sequence[SearchJob], with_lam: bool) -> dict[tuple, list[int]]:
    """Job indices per property set (and λ): each group is one batched search."""
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault((tuple(job.properties), job.lam if with_lam else None), []).append(i)
    return groups


def cxx_compiler() -> str | None:
    """The C++ compiler torch.compile would use on the CPU ($CXX, g++, c++, clang++), if any."""
    import os
    import shutil

    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def compile_decision(setting: bool | str, run_compile: bool, device: torch.device) -> tuple[bool, str]:
    """Whether the served teacher compiles its search step, and why: the run config's
    search.compile or ``setting`` True force it; "auto" compiles on the CPU when a C++
    compiler is there (measured there: one query's inversion ≈ 2× faster); on CUDA "auto"
    keeps the captured graph uncompiled (compiled-and-captured is not measured on a GPU yet)."""
    if run_compile:
        return True, "search.compile"
    if setting is True:
        return True, "teacher.compile: true"
    if setting != "auto":
        return False, "off (teacher.compile: false)"
    if device.type != "cpu":
        return False, f"off (teacher.compile: auto compiles on the CPU only; this teacher is on {device.type})"
    compiler = cxx_compiler()
    if compiler is None:
        return False, "off (teacher.compile: auto found no C++ compiler: g++, c++, clang++ or $CXX)"
    return True, f"teacher.compile: auto, {compiler}"


class TeacherStage:
    """(z0, condition) -> z by Backward Search. ``invert_many`` runs one batched inversion per
    (property set, λ) group: concurrent requests share it."""

    def __init__(self, bundle: ServeBundle, device: str | None = None, max_batch: int = 8,
                 compile: bool | str = False) -> None:
        """``compile`` (the serve config's ``teacher.compile``): True compiles the search step
        with torch.compile, "auto" compiles on the CPU when a C++ compiler is found, False
        leaves it to the run config's search.compile. A compiled step is checked against the
        eager one when built; one that fails to build or to agree is not served: the teacher
        serves uncompiled and ``compile_note`` says why."""
        from cir_bench.models import load_checkpoint

        self.device = torch.device(device or bundle.device)
        model, _ = load_checkpoint(bundle.checkpoint, self.device)
        for p in model.parameters():
            p.requires_grad_(False)  # only z is differentiated
        self.heads = model.heads
        self.warmup_s = 0.0
        wanted, why = compile_decision(compile, bool(bundle.search.compile), self.device)
        self.search = bundle.search.model_copy(update={"compile": wanted})
        self.compiled, self.compile_note = False, why
        if wanted:
            self.warmup_s, outcomes = self._warm_up(list(bundle.students), max_batch)
            failed = [note for ok, note in outcomes if not ok]
            self.compiled = not failed
            if self.compiled:
                self.compile_note = f"on ({why}; compiled and verified in {self.warmup_s:.1f} s)"
            else:  # serve the plain step rather than a step that failed to build or to agree
                self.search = self.search.model_copy(update={"compile": False})
                self.compile_note = f"off: {failed[0]}"

    def info(self) -> dict[str, Any]:
        """What /stats reports of this teacher."""
        return {"compiled": self.compiled, "compile": self.compile_note, "compile_s": round(self.warmup_s, 2)}

    def _warm_up(self, query_sets: list[tuple[str, ...]], max_batch: int) -> tuple[float, list[tuple[bool, str]]]:
        """With search.compile, compile (and verify) the step of every query set for every
        bucket a batch of up to ``max_batch`` requests lands in, now rather than on the first
        requests that need it (seconds each; a load test at concurrency 16 stalled on one).
        Any λ reuses them. Returns the seconds and each step's outcome."""
        from cir_bench.search.backward import BUCKETS, BackwardSearch
        from cir_bench.search.backward_step import head_sizes

        sizes = [b for b in BUCKETS if b < max_batch] + [next(b for b in BUCKETS if b >= min(max_batch, BUCKETS[-1]))]
        d, _ = head_sizes(self.heads, list(self.heads))
        t0 = time.perf_counter()
        outcomes = []
        for props in query_sets:
            bs = BackwardSearch.from_config(self.search)
            for n in sizes:
                bs.invert(self.heads, torch.zeros(n, d, device=self.device), list(props),
                          torch.zeros(n, len(props), dtype=torch.long, device=self.device))
            outcomes += bs.compile_outcomes.values()
        return time.perf_counter() - t0, outcomes

    def invert_many(self, jobs: Sequence[SearchJob]) -> list[Searched]:
        """Backward Search of every job, one batch per (property set, λ)."""
        from cir_bench.search.backward import BackwardSearch

        out: list[Searched] = [None] * len(jobs)  # type: ignore[list-item]
        for (props, lam), idx in _groups(jobs, with_lam=True).items():
            bs = BackwardSearch.from_config(self.search, lam)
            lam = bs.config.lam
            z0 = torch.as_tensor(np.stack([jobs[i].z0 for i in idx]), dtype=torch.float32, device=self.device)
            cond = torch.as_tensor([list(jobs[i].classes) for i in idx], device=self.device)
            t0 = time.perf_counter()
            inv = bs.invert(self.heads, z0, list(props), cond)
            z, its, sat = inv.z.float().cpu().numpy(), inv.iterations.cpu().numpy(), inv.satisfied.cpu().numpy()
            ms = 1000 * (time.perf_counter() - t0)  # the group's inversion, where it ran (the rest is hops)
            for row, i in enumerate(idx):
                out[i] = Searched(z[row], len(idx), int(its[row]), bool(sat[row]), lam, ms)
        return out


class StudentStage:
    """(z0, condition) -> z with the distilled student of the condition's property set.

    On CUDA the inputs go through reused page-locked buffers (one asynchronous copy each) and
    ``on_device=True`` leaves z on the device for an index in the same process, so a request
    batch waits for the device once (in the index) instead of once per stage."""

    def __init__(self, bundle: ServeBundle, device: str | None = None) -> None:
        from cir_bench.models.student import Student

        self.device = torch.device(device or bundle.device)
        self.students = {tuple(props): Student.load(path, self.device).eval()
                         for props, path in bundle.students.items()}
        self._staging: dict[str, torch.Tensor] = {}
        self._copied: torch.cuda.Event | None = None  # the last copy out of the staging buffers

    def _to_device(self, name: str, array: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(np.ascontiguousarray(array))
        if self.device.type != "cuda":
            return host.to(self.device)
        buf = self._staging.get(name)
        if buf is None or buf.numel() < host.numel() or buf.dtype != host.dtype:
            buf = self._staging[name] = torch.empty(max(host.numel(), 4096), dtype=host.dtype, pin_memory=True)
        view = buf[: host.numel()].view(host.shape)
        view.copy_(host)
        return view.to(self.device, non_blocking=True)

    @torch.no_grad()
    def transform_many(self, jobs: Sequence[SearchJob], on_device: bool = False) -> list[Searched]:
        """The student of each job's property set, one batch per set (λ is the teacher's only)."""
        if self._copied is not None:
            self._copied.synchronize()  # the staging buffers may be overwritten now
        out: list[Searched] = [None] * len(jobs)  # type: ignore[list-item]
        for (props, _), idx in _groups(jobs, with_lam=False).items():
            z0 = self._to_device("z0", np.stack([np.asarray(jobs[i].z0, dtype=np.float32) for i in idx]))
            cond = self._to_device("cond", np.asarray([list(jobs[i].classes) for i in idx], dtype=np.int64))
            z = self.students[tuple(props)](z0, cond).float()
            if self.device.type == "cuda":
                self._copied = torch.cuda.Event()
                self._copied.record()
            rows = z if on_device else z.cpu().numpy()
            for row, i in enumerate(idx):
                out[i] = Searched(rows[row], len(idx))
        return out


class IndexStage:
    """Top-k over the database rows of the embedding store (backend from cir_bench.index)."""

    def __init__(self, bundle: ServeBundle, device: str | None = None) -> None:
        from cir_bench.index import build_index
        from cir_bench.embed import EmbeddingStore

        store = EmbeddingStore.load(Path(bundle.store))
        if store.ids != bundle.catalog.ids:
            raise ValueError(f"{bundle.store}: its item ids do not match the dataset's")
        self.z = store.z
        device = torch.device(device or bundle.device)
        self.index = build_index(bundle.index, store.z, bundle.catalog.database, device, **bundle.index_options)
        # for filtered_knn / soft_filtered_knn: the database rows, unit length, and the heads
        self.database = np.asarray(bundle.catalog.database, dtype=np.int64)
        self._row_of = {int(p): r for r, p in enumerate(self.database)}
        self.db_unit = torch.nn.functional.normalize(store.z[torch.as_tensor(self.database)].float(), dim=1)
        self._checkpoint, self._heads = bundle.checkpoint, None
        self._views: dict[tuple[str, str], torch.Tensor] = {}

    def vectors(self, positions: Sequence[int]) -> np.ndarray:
        return self.z[torch.as_tensor(list(positions), dtype=torch.long)].numpy()

    def search_many(self, jobs: Sequence[RankJob]) -> list[Ranked]:
        """One top-k for all plain jobs; the filtered ones (filtered_knn / soft_filtered_knn)
        scored over the whole database as the offline methods do."""
        plain = [i for i, j in enumerate(jobs) if j.filter is None]
        out: list[Ranked] = [None] * len(jobs)  # type: ignore[list-item]
        if plain:
            out_plain = self._search_plain([jobs[i] for i in plain])
            for i, r in zip(plain, out_plain):
                out[i] = r
        for i, j in enumerate(jobs):
            if j.filter is not None:
                out[i] = self._search_filtered(j)
        return out

    def _heads_view(self, prop: str, kind: str) -> torch.Tensor:
        """The heads' view of the database rows for ``prop``, computed once: predicted labels
        (N_db,) for the hard filter, log-probabilities (N_db, C) for the soft one
        (cir_bench.search.label_filters, as the offline methods compute them)."""
        from cir_bench.search.label_filters import database_labels, database_log_probs

        if (kind, prop) not in self._views:
            if self._heads is None:
                from cir_bench.models import load_checkpoint

                model, _ = load_checkpoint(self._checkpoint, torch.device("cpu"))
                self._heads = model.heads.eval()
            view = database_labels if kind == "hard" else database_log_probs
            self._views[(kind, prop)] = view(self._heads[prop], self.z[torch.as_tensor(self.database)])
        return self._views[(kind, prop)]

    def _search_filtered(self, job: RankJob) -> Ranked:
        from cir_bench.index import rank_scores
        from cir_bench.search.label_filters import hard_filter_scores, soft_filter_scores

        f = job.filter
        z = job.z.cpu() if torch.is_tensor(job.z) else job.z
        q = torch.nn.functional.normalize(torch.as_tensor(z, dtype=torch.float32)[None], dim=1)
        sim = q @ self.db_unit.T
        cond = torch.as_tensor([list(f.classes)])
        if f.kind == "hard":
            labels = torch.stack([self._heads_view(p, "hard") for p in f.properties], dim=1)
            ranked = hard_filter_scores(sim, labels, cond)
        else:
            ranked = soft_filter_scores(sim, [self._heads_view(p, "soft") for p in f.properties], cond, f.beta)
        exclude = job.exclude
        local = torch.as_tensor([self._row_of.get(int(exclude), -1)]) if exclude >= 0 else None
        k = min(job.k, ranked.shape[1] - (1 if local is not None and int(local[0]) >= 0 else 0))
        idx, top = rank_scores(ranked if ranked is not sim else sim.clone(), k, local)
        scores = torch.gather(sim, 1, idx) if f.kind == "hard" else top  # what the offline methods report
        return Ranked(self.database[idx[0].numpy()].tolist(), scores[0].tolist())

    def _search_plain(self, jobs: Sequence[RankJob]) -> list[Ranked]:
        if any(torch.is_tensor(j.z) for j in jobs):  # a student in this process left z on its device
            device = self.index.device
            z = torch.stack([torch.as_tensor(j.z, dtype=torch.float32).to(device) for j in jobs])
        else:
            z = torch.as_tensor(np.stack([j.z for j in jobs]), dtype=torch.float32)
        exclude = np.array([j.exclude for j in jobs])
        pos, scores = self.index.search(z, max(j.k for j in jobs),
                                        exclude=exclude if (exclude >= 0).any() else None)
        return [Ranked(pos[i, : j.k].tolist(), scores[i, : j.k].tolist())
                for i, j in enumerate(jobs)]


