"""Real-dataset loaders on tiny replicas of their native layouts, and `cir-bench run` on each."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cir_bench.cli import main
from cir_bench.data import get_dataset
from cir_bench.data.base import BadImageError
from cir_bench.data.files import DatasetLayoutError

from . import replicas


@pytest.fixture()
def cub_root(tmp_path):
    return replicas.cub(tmp_path / "cub")


@pytest.fixture()
def apy_root(tmp_path):
    return replicas.apy(tmp_path / "apy")


@pytest.fixture()
def csv_root(tmp_path):
    return replicas.csv_folder(tmp_path / "mine")


def _all_rgb(ds):
    return all(ds.load_image(i).mode == "RGB" for i in range(len(ds)))


def test_cub_replica(cub_root):
    ds = get_dataset("cub", str(cub_root), {"test_fraction": 0.25})
    assert [p.name for p in ds.properties] == ["bird"]
    assert ds.property("bird").classes == ("001.Species_A", "002.Species_B", "003.Species_C")
    assert len(ds) == 24 and _all_rgb(ds)  # grayscale and CMYK files included
    assert any("Espèce_été" in it.id for it in ds.items)  # non-ASCII path
    # the attribute present everywhere is above the 0.8 quantile: never a tag
    assert all("has_bill_shape::a" not in it.tags for it in ds.items)
    for it in ds.items:
        species = ds.property("bird").classes[it.labels["bird"]]
        assert species in it.tags
        c = int(species[:3]) - 1
        # attributes joined by image id: class c has attributes with index % 3 == c % 3
        expected = {n for k, n in enumerate(["has_bill_shape::a", "has_bill_shape::b", "has_bill_shape::c",
                                             "has_wing_color::x", "has_wing_color::y", "has_wing_color::z"])
                    if k % 3 == c % 3 and k != 0}
        assert it.tags - {species} == expected
    test = ds.split_indices("test")
    assert sorted(np.bincount(ds.labels("bird")[test]).tolist()) == [2, 2, 2]  # stratified 25 %
    official = get_dataset("cub", str(cub_root), {"split": "official"})
    assert len(official.split_indices("train")) == 12


def test_cub_errors(cub_root, tmp_path):
    with pytest.raises(DatasetLayoutError, match="needs --root"):
        get_dataset("cub", None, {})
    with pytest.raises(DatasetLayoutError, match="is not a folder"):
        get_dataset("cub", str(tmp_path / "nowhere"), {})
    (cub_root / "CUB_200_2011" / "image_class_labels.txt").rename(cub_root / "moved.txt")
    with pytest.raises(DatasetLayoutError, match="image_class_labels.txt not found"):
        get_dataset("cub", str(cub_root), {})
    (cub_root / "moved.txt").write_text(
        (cub_root / "moved.txt").read_text().replace("24 3", "24 7"))
    (cub_root / "moved.txt").rename(cub_root / "CUB_200_2011" / "image_class_labels.txt")
    with pytest.raises(DatasetLayoutError, match="class id 7, which classes.txt does not define"):
        get_dataset("cub", str(cub_root), {})


def test_missing_image_is_an_error_or_skipped_and_counted(cub_root):
    victim = next((cub_root / "CUB_200_2011" / "images").rglob("Species_B_0003.jpg"))
    victim.unlink()
    with pytest.raises(BadImageError, match="(?s)1 image file\\(s\\) missing.*Species_B_0003.jpg"):
        get_dataset("cub", str(cub_root), {})
    corrupt = next((cub_root / "CUB_200_2011" / "images").rglob("Species_C_0001.jpg"))
    corrupt.write_bytes(b"not a jpeg")
    ds = get_dataset("cub", str(cub_root), {"skip_bad_images": True})
    assert len(ds) == 22
    assert ds.report["skipped_missing_images"] == 1 and ds.report["skipped_bad_images"] == 1


def test_apy_replica(apy_root):
    ds = get_dataset("apy", str(apy_root), {})
    assert ds.property("category").classes == ("aeroplane", "bicycle", "bird")  # read from disk, in file order
    assert ds.report["degenerate_boxes_skipped"] == 1  # the zero-area box
    assert len(ds) == 18 + 1  # 18 objects + the second object of one image
    assert _all_rgb(ds)
    crops = {it.id: ds.load_image(i).size for i, it in enumerate(ds.items)}
    clipped = [size for item_id, size in crops.items() if item_id.endswith("2008_000004")]
    assert clipped == [(45, 39)]  # box 20 10 90 70 (1-based, inclusive) clipped to the 64x48 image
    zero = next(it for it in ds.items if it.id.endswith("2008_000003"))
    assert zero.tags == frozenset({"aeroplane"})  # all-zero attribute row: only the class
    assert any("Foot/Shoe" in it.tags for it in ds.items)  # names read as whole lines
    assert set(it.split for it in ds.items) == {"train", "test"}
    with_yahoo = get_dataset("apy", str(apy_root), {"include_ayahoo": True})
    assert "donkey" in with_yahoo.property("category").classes


def test_apy_errors(apy_root):
    path = apy_root / "attribute_data" / "apascal_train.txt"
    path.write_text(path.read_text() + "2008_000001.jpg zeppelin 1 1 5 5 0 0 0 0\n")
    with pytest.raises(DatasetLayoutError, match="class 'zeppelin' is not in class_names.txt"):
        get_dataset("apy", str(apy_root), {})
    path.write_text("2008_000001.jpg bird 1 1 5\n")
    with pytest.raises(DatasetLayoutError, match="expected 10 fields"):
        get_dataset("apy", str(apy_root), {})
    (apy_root / "attribute_data" / "class_names.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="class_names.txt not found"):
        get_dataset("apy", str(apy_root), {})


def test_csv_replica(csv_root):
    ds = get_dataset("csv", str(csv_root), {})
    assert [p.name for p in ds.properties] == ["style", "genre"]
    assert ds.property("style").classes == ("Baroque", "Cubism", "Rococo")
    assert len(ds) == 36 and _all_rgb(ds)
    assert any("naïve_été" in it.id for it in ds.items)
    it = ds.items[0]
    assert {"oil"} < it.tags
    assert len(ds.split_indices("test")) == 12
    with pytest.raises(DatasetLayoutError, match="property column\\(s\\) \\['medium'\\]"):
        get_dataset("csv", str(csv_root), {"properties": ["medium"]})
    (csv_root / "labels.csv").write_text("file,style\nimg/a.jpg,Baroque\n")
    with pytest.raises(DatasetLayoutError, match="has no 'path' column"):
        get_dataset("csv", str(csv_root), {})


@pytest.mark.parametrize("name, builder, extra", [
    ("cub", replicas.cub, []),
    ("apy", replicas.apy, []),
    ("csv", replicas.csv_folder, []),
    ("wikiart", replicas.wikiart_artgan, ["--set", "queries.n_queries=2"]),
])
def test_run_end_to_end_on_each_replica(name, builder, extra, tmp_path, cache_dir, capsys):
    root = builder(tmp_path / name)
    out = tmp_path / f"run-{name}"
    args = ["run", "--no-progress", "--dataset", name, "--root", str(root), "--out", str(out),
            "--cache-dir", str(cache_dir), "--device", "cpu",
            "--set", "train.epochs=2", "--set", "model.input_size=32", "--set", "queries.n_queries=6",
            "--set", "queries.min_relevant=2", "--set", "student.epochs=2",
            "--set", "train.batch_size=8", "--set", "eval.k=5", *extra]
    if name != "wikiart":  # the λ curve is the same code on every loader: one replica runs it
        args += ["--set", "eval.lambda_curve=[]"]
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dataset"]["name"] == name and manifest["dataset"]["root"] == str(root)
    assert "precision@10" in captured.out or "precision@" in captured.out


def test_wikiart_artgan_replica(tmp_path):
    root = replicas.wikiart_artgan(tmp_path / "wa")
    ds = get_dataset("wikiart", str(root), {})
    assert ds.property("style").classes == tuple(replicas.WIKI_STYLES)
    genre = ds.property("genre")
    assert genre.classes == ("landscape", "portrait", "unknown_genre") and genre.excluded == ("unknown_genre",)
    assert len(ds) == 30 and _all_rgb(ds)  # mojibake (case) and NFD names found
    assert ds.report["matched_by_normalised_name"] == 2
    assert ds.report["images_without_genre"] == 4
    nouveau = [it for it in ds.items if it.id.startswith("Art_Nouveau_Modern/")]
    assert nouveau and all(it.labels["style"] == 0 for it in nouveau)  # label from the index
    assert {"flowers", "woman", "oiloncanvas"} <= ds.items[0].tags  # the paper's normalisation
    assert all("nan" not in t for it in ds.items for t in it.tags)
    assert len(ds.split_indices("test")) == 6  # joint 80/20
    from cir_bench.data.queries import build_query_set

    qs = build_query_set(ds, ["style", "genre"], 5, seed=0, min_relevant=1, database_split="all")
    assert "unknown_genre" not in {genre.classes[c] for c in qs.conditions[:, 1]}


def test_wikiart_errors(tmp_path):
    root = replicas.wikiart_artgan(tmp_path / "wa")
    rows = (root / "wikiart_csv" / "style_val.csv").read_bytes() + b"Baroque/extra.jpg,9\r\n"
    (root / "wikiart_csv" / "style_val.csv").write_bytes(rows)
    with pytest.raises(DatasetLayoutError, match="class index 9 outside 0..2"):
        get_dataset("wikiart", str(root), {})
    (root / "wikiart_csv" / "style_class.txt").unlink()
    with pytest.raises(DatasetLayoutError, match="style_class.txt not found"):
        get_dataset("wikiart", str(root), {})
    with pytest.raises(DatasetLayoutError, match="no \\*.parquet"):
        get_dataset("wikiart", str(tmp_path), {})


def test_wikiart_parquet_replica(tmp_path):
    root = replicas.wikiart_parquet(tmp_path / "hf")
    ds = get_dataset("wikiart", str(root), {})
    assert ds.property("style").classes == tuple(replicas.WIKI_STYLES)
    assert ds.property("genre").excluded == ("Unknown Genre",)
    assert len(ds) == 30 and ds.load_image(0).mode == "RGB"
    assert ds.report["layout"] == "huggingface-parquet"


def test_tasks_and_paper_recipe_set_the_table1_protocol(tmp_path):
    from cir_bench.cli import build_config, make_parser

    args = make_parser().parse_args(["run", "--task", "wikiart-multi", "--root", str(tmp_path), "--paper-recipe"])
    cfg = build_config(args)
    assert cfg.dataset.name == "wikiart" and cfg.dataset.options == {} and cfg.dataset.root == str(tmp_path)
    assert cfg.queries.sets == [["style", "genre"]] and cfg.queries.n_queries == 1000
    assert cfg.queries.min_relevant == 10
    assert cfg.model.backbone == "convnext_base" and cfg.model.pretrained and not cfg.model.finetune
    assert cfg.model.embed_dim == 256 and cfg.train.epochs == 100 and cfg.train.augment
    with pytest.raises(ValueError, match="unknown task 'cub-birds'"):
        build_config(make_parser().parse_args(["run", "--task", "cub-birds"]))


def test_square_resize_and_paper_augmentation():
    from PIL import Image

    from cir_bench.data.transforms import build_transform

    img = Image.new("RGB", (80, 40), (10, 20, 30))
    assert build_transform(32, (0.5,) * 3, (0.5,) * 3)(img).shape == (3, 32, 32)  # resize + centre crop
    assert build_transform(32, (0.5,) * 3, (0.5,) * 3, square=True)(img).shape == (3, 32, 32)
    train = build_transform(32, (0.5,) * 3, (0.5,) * 3, train=True, augment=True)
    assert train(img).shape == (3, 32, 32)
    names = [type(t).__name__ for t in train.transforms]
    assert names[1:5] == ["Resize", "RandomCrop", "RandomHorizontalFlip", "RandomVerticalFlip"]


def test_cub_crop_to_box(cub_root):
    ds = get_dataset("cub", str(cub_root), {"crop_to_box": True})
    assert ds.load_image(0).size == (30, 25)  # box "2 3 30 25" (x y w h) inside the 48x40 image
