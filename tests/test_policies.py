"""Built-in policies select what their documented rules say, compose in order, and load from YAML files."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import copy_dataset, kept_keys
from pipeline_data import plant, rows

from curate.errors import InputError
from curate.policies import builtin_names, load_policy
from curate.stages.export import ExportConfig, select


def f32(v):
    return None if v is None else float(np.float32(v))


@pytest.fixture(scope="module")
def source(pipeline_dataset):
    """Downloaded, scored and deduplicated by the real stages (conftest.py); read-only."""
    return str(pipeline_dataset)


@pytest.fixture(scope="module")
def truth(source):
    return rows(source)


@pytest.fixture(scope="module")
def laion_source(source, truth, tmp_path_factory):
    """The real dataset with clip_score replaced by values around LAION's thresholds (0.28 English, 0.26
    other languages), which the tiny random model's scores never reach; every other column is real.
    A ladder 0.22 .. 0.33, and 0.27 (between the thresholds) for one foreign and one undetermined caption."""
    root = copy_dataset(source, tmp_path_factory.mktemp("laion") / "ds")
    scored = [t for t in truth if t["clip_score"] is not None]
    values = {t["key"]: 0.22 + (i * 7 % 12) * 0.01 for i, t in enumerate(scored)}
    foreign = next(t["key"] for t in scored if t["lang"] not in ("en", "und"))
    und = next(t["key"] for t in scored if t["lang"] == "und")
    values.update({foreign: 0.27, und: 0.27})
    plant(root, "score", "clip_score", values)
    return str(root)


def kept(source, *policy, **kw):
    return kept_keys(ExportConfig(source=source, policy=policy, **kw))


def ok_rows(truth, pred):
    return [t["key"] for t in truth if t["status"] == "success" and pred(t)]


def test_builtins_exist_and_document_their_source():
    assert {"laion", "datacomp-basic", "clip-top30", "dedup", "demo"} <= set(builtin_names())
    for name in builtin_names():
        p = load_policy(name)
        assert p.name == name and p.clauses and len(p.source) > 40
    assert "ViT-B/32" in load_policy("laion").source + load_policy("laion").description


def test_laion_thresholds_depend_on_language(laion_source):
    truth = rows(laion_source)
    want = ok_rows(truth, lambda t: t["clip_score"] is not None
                   and f32(t["clip_score"]) >= (0.28 if t["lang"] in ("en", "und") else 0.26))
    got = kept(laion_source, "laion")
    assert got == want
    # a non-English row between the two thresholds is kept, an English one is not
    assert any(t["lang"] != "en" and 0.26 <= f32(t["clip_score"]) < 0.28 for t in truth if t["key"] in got)
    # an undetermined caption gets the English threshold (one 'und' row has clip_score 0.27)
    assert any(t["lang"] == "und" and 0.26 <= f32(t["clip_score"]) < 0.28 for t in truth)
    assert not any(t["lang"] == "und" and f32(t["clip_score"]) < 0.28 for t in truth if t["key"] in got)


def test_datacomp_basic(source, truth):
    # DataComp's rule is fastText lid.176's top-1 label, whatever curate's language ID says
    assert any(t["lang"] == "en" and t["lang_fasttext"] != "en" for t in truth if t["status"] == "success")
    want = ok_rows(truth, lambda t: t["lang_fasttext"] == "en" and t["caption_words"] > 2 and t["caption_chars"] > 5
                   and min(t["orig_width"], t["orig_height"]) >= 200 and t["aspect_ratio"] <= 3)
    assert kept(source, "datacomp-basic") == want
    assert "00000002" + "00001" in want  # row 19: 200x200, on the boundary, kept


def test_dedup_is_null_safe_and_clip_top30_ranks(source, truth):
    assert kept(source, "dedup") == ok_rows(truth, lambda t: not t["is_duplicate"] and not t["eval_contaminated"])
    scored = [t for t in truth if t["clip_score"] is not None]
    k = int(np.floor(0.3 * len(scored) + 0.5))
    best = sorted(scored, key=lambda t: (-f32(t["clip_score"]), t["key"]))[:k]
    assert kept(source, "clip-top30") == sorted(t["key"] for t in best)


def test_policies_compose_in_order_and_files_work(source, truth, tmp_path):
    both = kept(source, "datacomp-basic", "dedup")
    assert both == sorted(set(kept(source, "datacomp-basic")) & set(kept(source, "dedup")))
    # top fraction after basic filtering ranks only the rows basic filtering left
    sel = select(ExportConfig(source=source, policy=("datacomp-basic", "clip-top30")))
    assert [c["clause"] for c in sel.counts][-1] == "clip-top30:top_fraction"
    assert sel.counts[-1]["remaining"] == int(np.floor(0.3 * len(kept(source, "datacomp-basic")) + 0.5))
    f = tmp_path / "mine.yaml"
    f.write_text("name: mine\nsource: a test\nclauses:\n  - {name: en, where: \"lang = 'en'\"}\n"
                 "top_fraction: 0.5\nby: clip_score\n")
    p = load_policy(str(f))
    assert [c.name for c in p.clauses] == ["mine:en", "mine:top_fraction"]
    assert len(kept(source, str(f))) == int(np.floor(0.5 * len(ok_rows(truth, lambda t: t["lang"] == "en")) + 0.5))


@pytest.mark.parametrize("text, msg", [
    ("name: x\nclauses: [{where: 1}]\n", "clauses[0]"),
    ("name: x\nthreshold: 3\n", "unknown field"),
    ("clauses: [{where: 'TRUE'}]\n", "'name' is required"),
    ("name: x\ntop_fraction: 2\nby: clip_score\n", "--top-fraction"),
])
def test_bad_policy_files_name_the_problem(tmp_path, text, msg):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(InputError, match="bad.yaml|--top") as e:
        load_policy(str(f))
    assert msg in str(e.value)
    with pytest.raises(InputError, match="neither a built-in"):
        load_policy("no-such-policy")


def test_demo_policy_keeps_undetermined_languages(source, truth, tmp_path):
    # the demo policy's own english clause, alone: 'und' rows stay, named foreign languages go
    clause = next(c for c in load_policy("demo").clauses if c.name == "demo:english")
    f = tmp_path / "english.yaml"
    f.write_text(f"name: english\nsource: the demo policy's clause\nclauses:\n  - {{name: en, where: \"{clause.where}\"}}\n")
    got = kept(source, str(f))
    assert got == ok_rows(truth, lambda t: t["lang"] in ("en", "und"))
    assert any(t["lang"] == "und" for t in truth if t["key"] in got)
