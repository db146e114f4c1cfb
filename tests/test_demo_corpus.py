"""The shipped demo corpus: disjoint deterministic splits, small images, the size budget, the rebuild
script on a tiny openclipart-like tree, and splits written as dataset dirs."""

from __future__ import annotations

import collections
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.demo import build_corpus as bc
from curate.demo.corpus import CORPUS_DIR, SPLITS, categories, corpus_bytes, load_split, write_split_dataset
from curate.errors import ConfigMismatchError, InputError
from curate.io.layout import DatasetDir
from curate.io.ledger import LEDGER_FIELDS
from curate.io.shards import iter_samples

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def meta() -> dict[str, pa.Table]:
    cols = ["image_id", "category", "title", "caption", "lang_hint", "width", "height", "split"]
    return {s: load_split(s, columns=cols) for s in SPLITS}


def test_package_share_under_7_mb_and_every_file_under_5_mb():
    assert corpus_bytes() < 7_000_000
    assert all(p.stat().st_size < 5_000_000 for p in CORPUS_DIR.iterdir())
    assert sorted(p.name for p in CORPUS_DIR.iterdir()) == ["eval.parquet", "pool.parquet", "seed.parquet"]
    # the parquet files ship in the wheel only if package-data names them
    assert '"demo/corpus/*"' in (ROOT / "pyproject.toml").read_text()


def test_splits_are_disjoint_and_sized(meta):
    ids = {s: set(t["image_id"].to_pylist()) for s, t in meta.items()}
    assert not ids["pool"] & ids["seed"] and not ids["pool"] & ids["eval"] and not ids["seed"] & ids["eval"]
    # the pool ships a share of its rows (a second hash of the image_id); the split shares are of the whole
    assert all(bc.in_pool_share(i, bc.POOL_SHARE) for i in ids["pool"])
    total = len(ids["seed"]) + len(ids["eval"]) + len(ids["pool"]) / bc.POOL_SHARE
    assert total > 7000 and len(ids["pool"]) > 4000
    assert 0.10 <= len(ids["seed"]) / total <= 0.15
    assert 0.07 <= len(ids["eval"]) / total <= 0.11
    for s, t in meta.items():
        assert set(t["split"].to_pylist()) == {s}


def test_split_rule_is_reproduced_from_the_image_id(meta):
    """The stored split is what the hash rule gives, so a rebuild puts every image in the same split."""
    rows = [r for t in meta.values() for r in t.to_pylist()]
    # the category counts are taken before the pool is thinned, so they cannot be recounted here; the eval
    # split's categories are the ones the rule admitted
    eval_cats = set(meta["eval"]["category"].to_pylist())
    assert not eval_cats & bc.EVAL_EXCLUDED
    for r in rows:
        seed_ok = r["lang_hint"] == "en" and len(r["caption"].split()) >= 2
        assert bc.assign_split(r["image_id"], r["category"], seed_ok, eval_cats) == r["split"], r["image_id"]


def test_eval_has_enough_examples_per_category(meta):
    counts = collections.Counter(meta["eval"]["category"].to_pylist())
    assert len(counts) >= 8
    assert min(counts.values()) >= 3
    assert not set(counts) & bc.EVAL_EXCLUDED
    assert categories("eval") == sorted(counts)


def test_seed_is_english_and_pool_keeps_foreign_titles(meta):
    seed = meta["seed"].to_pylist()
    assert all(r["lang_hint"] == "en" and len(r["caption"].split()) >= 2 for r in seed)
    pool = meta["pool"].to_pylist()
    foreign = [r for r in pool if r["lang_hint"] != "en"]
    assert len(foreign) > 100
    assert any(r["lang_hint"] == "it" for r in foreign)
    # the caption of a foreign-titled image is rebuilt in English-ish words, the title kept as is
    assert all(r["caption"] != r["title"] for r in foreign if r["title"])


def test_images_are_small_rgb_jpegs():
    t = load_split("eval", columns=["image", "width", "height"]).slice(0, 60)
    for r in t.to_pylist():
        im = Image.open(io.BytesIO(r["image"]))
        assert im.format == "JPEG" and im.mode == "RGB"
        assert im.size == (r["width"], r["height"]) and max(im.size) <= bc.DEFAULT_MAX_SIDE


def test_unknown_split_is_an_input_error():
    with pytest.raises(InputError, match="train"):
        load_split("train")


def test_write_split_dataset(tmp_path):
    root = write_split_dataset("eval", tmp_path / "eval", samples_per_shard=300)
    ds = DatasetDir.at(root)
    n = load_split("eval", columns=["image_id"]).num_rows
    assert ds.shards() == ["00000000", "00000001", "00000002"]
    ledger = pa.concat_tables([pq.read_table(p) for p in ds.ledger_files()])
    assert ledger.num_rows == n
    assert set(ledger["status"].to_pylist()) == {"success"}
    assert ledger.schema.names[:len(LEDGER_FIELDS)] == [f.name for f in LEDGER_FIELDS]
    assert ledger["label"].to_pylist() == ledger["category"].to_pylist()
    samples = [s for shard in ds.shards() for s in iter_samples(ds.shard_tar(shard))]
    assert [s["key"] for s in samples] == ledger["key"].to_pylist()
    assert samples[0]["meta"]["label"] == ledger["label"][0].as_py() and samples[0]["caption"]
    assert (root / "manifest.json").exists()
    # all shards done: a second call is a no-op (resume), not a rewrite
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    write_split_dataset("eval", root, samples_per_shard=300)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before
    with pytest.raises(ConfigMismatchError):
        write_split_dataset("seed", root, samples_per_shard=300)


SVG = """<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"><metadata><rdf:RDF><cc:Work rdf:about="">
<dc:title>{title}</dc:title><dc:description>{desc}</dc:description>
<dc:subject><rdf:Bag><rdf:li></rdf:li><rdf:li>hash</rdf:li>{kws}</rdf:Bag></dc:subject>
<dc:creator><cc:Agent><dc:title>{creator}</dc:title></cc:Agent></dc:creator></cc:Work></rdf:RDF></metadata></svg>"""


def write_clipart(root: Path, rel: str, title: str, kws: list[str], creator: str = "Jane Doe") -> None:
    png, svg = root / "png" / f"{rel}.png", root / "svg" / f"{rel}.svg"
    png.parent.mkdir(parents=True, exist_ok=True)
    svg.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGBA", (300, 150), (0, 0, 0, 0))
    im.paste((200, 30, 30, 255), (50, 25, 250, 125))
    im.save(png)
    li = "".join(f"<rdf:li>{k}</rdf:li>" for k in kws)
    svg.write_text(SVG.format(title=title, desc="a &amp; b", kws=li, creator=creator))


def test_parse_svg_metadata_takes_the_works_fields():
    title, desc, kws, creator = bc.parse_svg_metadata(
        SVG.format(title="Red &lt;box&gt;", desc="d", kws="<rdf:li>box</rdf:li>", creator="Ann"))
    assert (title, desc, creator) == ("Red <box>", "d", "Ann")
    assert kws == ("", "hash", "box")
    assert bc.clean_keywords(kws + ("Ann", "lemon_theme_icon", "Big_Box")) == ["box", "ann", "big box"]
    assert bc.clean_keywords(kws + ("Ann",), creator="Ann") == ["box"]


def test_rebuild_from_a_tiny_tree_is_deterministic(tmp_path):
    src = tmp_path / "openclipart"
    write_clipart(src, "animals/birds/red_box_01", "Red box", ["bird", "box", "animal"])
    write_clipart(src, "animals/birds/cigno_architetto_fra_01", "Cigno di spalle", ["bird"],
                  creator="Architetto Francesco Rollandin")
    write_clipart(src, "computer/icons/v.2_icon", "Lemon SVG theme", ["icons", "computer"])
    (src / "png" / "computer" / "no_svg_twin.png").write_bytes((src / "png/computer/icons/v.2_icon.png").read_bytes())
    t1 = bc.build(src, max_side=64, quality=80, workers=1)
    t2 = bc.build(src, max_side=64, quality=80, workers=1)
    assert t1.equals(t2)
    rows = {r["image_id"]: r for r in t1.to_pylist()}
    assert set(rows) == {"animals/birds/red_box_01", "animals/birds/cigno_architetto_fra_01", "computer/icons/v.2_icon"}
    red = rows["animals/birds/red_box_01"]
    assert red["caption"] == "Red box, bird, animal" and red["category"] == "animals" and red["folder"] == "animals/birds"
    assert red["description"] == "a & b"
    im = Image.open(io.BytesIO(red["image"]))
    assert im.size == (64, 32) and im.mode == "RGB"
    assert min(im.getpixel((0, 0))) > 240  # the transparent corner went onto white
    swan = rows["animals/birds/cigno_architetto_fra_01"]
    assert swan["lang_hint"] == "it" and swan["title"] == "Cigno di spalle" and swan["caption"] == "Birds, bird"
    sizes = bc.write_corpus(t1, tmp_path / "out")
    assert set(sizes) == {"pool.parquet", "seed.parquet", "eval.parquet"}
    back = pa.concat_tables([pq.read_table(tmp_path / "out" / n) for n in sizes])
    assert back.num_rows == 3 and back.schema.equals(bc.SCHEMA)
    # --from-corpus: downscaled again, and pool rows outside the share dropped by the same rule
    small = bc.shrink(back, max_side=32, quality=80, pool_share=0.5)
    assert small.equals(bc.shrink(back, max_side=32, quality=80, pool_share=0.5))
    kept = {r["image_id"]: r for r in small.to_pylist()}
    assert set(kept) == {r["image_id"] for r in back.to_pylist()
                         if r["split"] != "pool" or bc.in_pool_share(r["image_id"], 0.5)}
    for r in kept.values():
        im = Image.open(io.BytesIO(r["image"]))
        assert im.size == (r["width"], r["height"]) and max(im.size) == 32
    assert bc.build(src, max_side=64, quality=80, workers=1, pool_share=0.5).num_rows == \
        sum(1 for r in back.to_pylist() if r["split"] != "pool" or bc.in_pool_share(r["image_id"], 0.5))
