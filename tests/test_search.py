"""`curate index`, `curate search` and `curate serve` on a real small dataset: images downloaded from a loopback
server, scored with a tiny open_clip config (random init), indexed; results checked against brute force over
the embedding files, hostile captions checked escaped, and the search page driven in headless Chromium."""

from __future__ import annotations

import html
import json
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dataset_factory import color_image, jpeg_bytes
from loopback import LoopServer

from curate.cli import main
from curate.io.layout import DatasetDir, shard_name

N_IMAGES = 40
HOSTILE = {
    5: "<script>window.__pwned = 1</script> a cat on a mat",
    6: "\" onmouseover=\"window.__pwned=2\" x=' <b>bold</b> & friends",
    7: "<img src=x onerror=\"window.__pwned=3\"> a dog",
}
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def caption(i: int) -> str:
    return HOSTILE.get(i, ["a red square on blue", "a small striped cat", "a green field at noon",
                           "an old map of a city"][i % 4] + f" number {i}")


@pytest.fixture(scope="module")
def dataset(tiny_model, tmp_path_factory):
    """Download N_IMAGES images from a loopback server (3 shards), score with the tiny config, index (exact)."""
    tmp = tmp_path_factory.mktemp("search")
    cfg = tiny_model
    server = LoopServer()
    try:
        urls = [server.image(f"/img{i}.jpg", jpeg_bytes(color_image(i, (64, 56)))) for i in range(N_IMAGES)]
        urls.append(server.url("/missing.jpg"))  # a failed row: in the ledger, not in the index
        pq.write_table(pa.table({"URL": urls, "TEXT": [caption(i) for i in range(len(urls))]}), tmp / "urls.parquet")
        out = tmp / "ds"
        assert main(["download", str(tmp / "urls.parquet"), "--out", str(out), "--url-col", "URL",
                     "--caption-col", "TEXT", "--allow-host", server.endpoint, "--image-size", "32",
                     "--samples-per-shard", "16", "--timeout", "2", "--deadline", "4", "--no-progress"]) == 0
    finally:
        server.close()
    assert main(["score", str(out), "--model", str(cfg), "--pretrained", "none", "--save-text-embeddings",
                 "--batch-size", "8", "--loader-workers", "0", "--no-progress"]) == 0
    assert main(["index", str(out), "--no-progress"]) == 0
    return DatasetDir.at(out)


def embeddings(ds: DatasetDir, suffix: str = ".img_emb.npy") -> tuple[list[str], np.ndarray, dict[str, str]]:
    """(keys, float32 vectors, key -> caption) of every scored sample, from the files score wrote."""
    keys, vecs, captions = [], [], {}
    for shard in ds.done_shards("score"):
        t = pq.read_table(ds.signals("score", shard)).to_pylist()
        emb = np.load(ds.signals("score", shard, suffix)).astype(np.float32)
        for r in t:
            if r["scored"]:
                keys.append(r["key"])
                vecs.append(emb[r["emb_row"]])
    for shard in ds.shards():
        for r in pq.read_table(ds.ledger(shard), columns=["key", "caption"]).to_pylist():
            captions[r["key"]] = r["caption"]
    return keys, np.stack(vecs), captions


def search_json(ds: DatasetDir, capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["search", str(ds.root), *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_index_layout_manifest_and_resume(dataset, capsys):
    ds = dataset
    meta = json.loads((ds.root / "index" / "index.json").read_text())
    keys, _, _ = embeddings(ds)
    assert meta["rows"] == len(keys) == N_IMAGES and meta["kind"] == "flat"
    assert set(meta["modalities"]) == {"image", "text"}  # score saved text embeddings
    assert meta["modalities"]["image"]["recall"] == 1.0  # exact
    ids = pq.read_table(ds.root / "index" / "ids.parquet")
    assert sorted(ids["key"].to_pylist()) == sorted(keys)
    entry = json.loads(ds.manifest.read_text())["stages"]["index"]
    assert entry["status"] == "complete" and entry["config"]["scorer"] == "score"
    assert entry["counts"]["recall_at_10"] == 1.0 and entry["counts"]["factory"] == "Flat"
    capsys.readouterr()
    assert main(["index", str(ds.root), "--no-progress"]) == 0  # resume: nothing to redo
    assert "0 shard(s) done, 3 already done" in capsys.readouterr().err
    assert main(["index", str(ds.root), "--kind", "ivf-fp16", "--no-progress"]) == 2  # other config, no --redo


def test_text_query_is_encoded_with_the_scorers_model(dataset, capsys):
    """A caption as the query: the scorer's text tower gives that sample's saved text embedding, so the
    hits and scores must equal brute force of that vector over the image embeddings."""
    ds = dataset
    keys, img, captions = embeddings(ds)
    _, txt, _ = embeddings(ds, ".txt_emb.npy")
    target = keys.index(next(k for k in keys if captions[k] == caption(2)))
    doc = search_json(ds, capsys, caption(2), "-k", "5")
    hits = doc["queries"][0]["hits"]
    sims = img @ txt[target]
    order = np.argsort(-sims, kind="stable")[:5]
    assert [h["key"] for h in hits] == [keys[i] for i in order]
    assert [h["score"] for h in hits] == pytest.approx([float(sims[i]) for i in order], abs=2e-3)
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert all(h["caption"] == captions[h["key"]] and h["status"] == "success" for h in hits)
    # text modality: the same caption finds its own sample first
    doc = search_json(ds, capsys, caption(2), "-k", "3", "--modality", "text")
    assert doc["queries"][0]["hits"][0]["key"] == keys[target]


def test_key_and_image_queries_and_where(dataset, capsys, tmp_path):
    ds = dataset
    keys, img, _ = embeddings(ds)
    doc = search_json(ds, capsys, "--key", keys[3], "-k", "4")
    hits = doc["queries"][0]["hits"]
    sims = img @ img[3]
    order = [i for i in np.argsort(-sims, kind="stable") if i != 3][:4]
    assert [h["key"] for h in hits] == [keys[i] for i in order]  # neighbours, the sample itself left out
    # --where: the same SQL as export, applied to the hits
    clip = {r["key"]: r["clip_score"] for s in ds.done_shards("score") for r in pq.read_table(ds.signals("score", s)).to_pylist()}
    cut = float(np.median([clip[k] for k in keys]))
    doc = search_json(ds, capsys, "--key", keys[3], "-k", "6", "--where", f"clip_score > {cut}")
    hits = doc["queries"][0]["hits"]
    passing = [keys[i] for i in np.argsort(-sims, kind="stable") if i != 3 and clip[keys[i]] > cut][:6]
    assert [h["key"] for h in hits] == passing and doc["where"] == f"clip_score > {cut}"
    # an image file as the query: one of the downloaded images finds itself first
    shard = ds.shards()[0]
    from curate.io.shards import iter_samples

    first = next(iter_samples(ds.shard_tar(shard)))
    (tmp_path / "q.jpg").write_bytes(first["image"])
    doc = search_json(ds, capsys, "--image", str(tmp_path / "q.jpg"), "-k", "1")
    assert doc["queries"][0]["hits"][0]["key"] == first["key"]
    assert doc["queries"][0]["hits"][0]["score"] == pytest.approx(1.0, abs=5e-3)


def test_bad_inputs_exit_2(dataset, tmp_path, capsys):
    ds = dataset
    assert main(["search", str(ds.root), "--key", "nope"]) == 2
    assert main(["search", str(ds.root), "cat", "--where", "no_such_column > 1"]) == 2
    assert main(["search", str(ds.root)]) == 2
    bare = tmp_path / "bare"
    shutil.copytree(ds.root, bare, ignore=shutil.ignore_patterns("index"))
    capsys.readouterr()
    assert main(["search", str(bare), "cat"]) == 2
    assert "curate index" in capsys.readouterr().err
    assert main(["index", str(bare), "--memory-budget", "10", "--kind", "ivf-pq", "--no-progress"]) == 2


def test_html_grid_escapes_hostile_captions(dataset, tmp_path, capsys):
    out = tmp_path / "hits.html"
    keys, _, captions = embeddings(dataset)
    assert main(["search", str(dataset.root), "--key", keys[0], "-k", str(N_IMAGES - 1), "--html", str(out)]) == 0
    page = out.read_text()
    assert "<script>" not in page and "onerror=" not in page.replace("onerror=&quot;", "")
    for text in HOSTILE.values():
        assert html.escape(text) in page  # shown, as text
    assert page.count("data:image/jpeg;base64,") == N_IMAGES - 1 and "http://" not in page


def test_ivf_index_resumes_a_lost_part(dataset, tmp_path, capsys):
    ds = DatasetDir.at(tmp_path / "copy")
    shutil.copytree(dataset.root, ds.root)
    assert main(["index", str(ds.root), "--kind", "ivf-fp16", "--nlist", "4", "--redo", "--no-progress"]) == 0
    meta = json.loads((ds.root / "index" / "index.json").read_text())
    assert meta["factory"] == "IVF4,SQfp16" and 1 <= meta["modalities"]["image"]["nprobe"] <= 4
    assert meta["modalities"]["image"]["recall"] >= 0.97
    (ds.root / "index" / "parts" / f"{shard_name(1)}.image.codes.npy").unlink()  # a lost part: only its shard is redone
    capsys.readouterr()
    # the redone task runs in a spawned worker process: tasks carry only JSON, never the index object
    assert main(["index", str(ds.root), "--kind", "ivf-fp16", "--nlist", "4", "--workers", "2", "--no-progress"]) == 0
    assert "1 shard(s) done, 2 already done" in capsys.readouterr().err
    keys, img, _ = embeddings(ds)
    doc = search_json(ds, capsys, "--key", keys[10], "-k", "3")
    exact = [keys[i] for i in np.argsort(-(img @ img[10]), kind="stable") if i != 10][:3]
    assert [h["key"] for h in doc["queries"][0]["hits"]] == exact  # nprobe tuned to full recall here


# --- the served page ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(dataset):
    from curate.search.searcher import Searcher
    from curate.search.server import make_server

    s = Searcher(dataset.root)
    httpd = make_server(s, "127.0.0.1", 0)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    s.close()


def get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_serve_command_binds_loopback_and_answers(dataset):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "curate.cli", "serve", str(dataset.root), "--port", "0"],
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        assert line.startswith("serve: http://127.0.0.1:"), line
        url = line.split()[1]
        status, _, body = get(url + "api/info")
        info = json.loads(body)
        assert status == 200 and info["rows"] == N_IMAGES and info["modalities"] == ["image", "text", "both"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_api_is_read_only_and_never_sql(served, dataset):
    status, headers, body = get(served + "/")
    assert status == 200 and "script-src 'self'" in headers["Content-Security-Policy"]
    assert b"http://" not in body and b"https://" not in body  # no external assets
    status, _, body = get(served + "/api/search?q=" + urllib.request.quote("a cat'; DROP TABLE samples; --") + "&k=5")
    assert status == 200 and len(json.loads(body)["hits"]) == 5
    status, _, body = get(served + "/api/sample?key=" + urllib.request.quote("' OR 1=1 --"))
    assert status == 400 and "is not a sample" in json.loads(body)["error"]
    keys, _, captions = embeddings(dataset)
    hostile_key = next(k for k in keys if captions[k] == HOSTILE[5])
    status, _, body = get(served + "/api/sample?key=" + hostile_key)
    s = json.loads(body)
    assert status == 200 and s["ledger"]["caption"] == HOSTILE[5] and "clip_score" in s["signals"]
    req = urllib.request.Request(served + "/api/search?q=x", method="POST", data=b"")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 405


@pytest.mark.browser
@pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                    reason="Debian chromium + chromium-driver are not installed: apt-get install chromium chromium-driver")
def test_search_page_in_headless_chromium(served, dataset, tmp_path):
    from selenium import webdriver  # the dev extra
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(served + "/")
        wait.until(lambda d: "samples" in d.find_element(By.ID, "info").text)
        box = driver.find_element(By.ID, "q")
        box.send_keys("a small striped cat")
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#grid .tile")) == 24)
        tiles = driver.find_elements(By.CSS_SELECTOR, "#grid .tile")
        assert all(t.find_element(By.TAG_NAME, "img").get_attribute("src").startswith("data:image/jpeg")
                   for t in tiles)
        # neighbours of a sample whose caption is hostile: shown as text, never run
        keys, _, captions = embeddings(dataset)
        driver.get(served + "/#key=" + next(k for k in keys if captions[k] == HOSTILE[5]))
        wait.until(ec.visibility_of_element_located((By.ID, "detail")))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#neighbours .tile")) == 12)
        assert driver.find_element(By.ID, "detail-caption").text == HOSTILE[5]
        first = driver.find_elements(By.CSS_SELECTOR, "#neighbours .tile")[0]
        nkey = first.get_attribute("data-key")
        first.click()  # a neighbour's own neighbours
        wait.until(lambda d: d.find_element(By.ID, "detail-title").text == f"Sample {nkey}")
        assert driver.find_elements(By.CSS_SELECTOR, "#ledger tr") and driver.find_elements(By.CSS_SELECTOR, "#signals tr")
        # every hostile caption reached the page somewhere, as text
        driver.find_element(By.ID, "q").clear()
        driver.find_element(By.ID, "q").send_keys("a cat on a mat")
        driver.find_element(By.ID, "go").click()
        wait.until(lambda d: "hits for" in d.find_element(By.ID, "status").text and "a cat on a mat" in d.find_element(By.ID, "status").text)
        assert driver.execute_script("return window.__pwned === undefined")
        assert not driver.find_elements(By.CSS_SELECTOR, "#grid script, #neighbours script, #grid b, #grid img[onerror]")
        errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
        assert errors == []
        shot = Path(__file__).resolve().parents[1] / "artifacts" / "search-page.png"
        shot.parent.mkdir(exist_ok=True)
        driver.save_screenshot(str(shot))
    except Exception:
        print(driver.page_source[:3000], driver.get_log("browser"))
        raise
    finally:
        driver.quit()


def test_id_table_maps_ids_to_keys_without_ledgers(dataset):
    """ids.parquet alone maps every index id to its key, shard and emb_row."""
    ids = pq.read_table(dataset.root / "index" / "ids.parquet").to_pylist()
    for shard in dataset.done_shards("score"):
        t = {r["key"]: r["emb_row"] for r in pq.read_table(dataset.signals("score", shard)).to_pylist() if r["scored"]}
        assert {r["key"]: r["emb_row"] for r in ids if r["shard"] == shard} == t


def test_report_grid_tiles_list_their_neighbours(dataset, tmp_path):
    out = tmp_path / "report.html"
    assert main(["report", str(dataset.root), "--out", str(out)]) == 0
    page = out.read_text()
    keys, img, _ = embeddings(dataset)
    assert page.count('<details class="nbrs">') >= 24  # every grid tile of an indexed dataset
    i = 0
    exact = [keys[j] for j in np.argsort(-(img @ img[i]), kind="stable") if j != i][:4]
    line = next(p for p in page.split('<details class="nbrs">') if f"#key={keys[i]}" in p)
    assert [x.split(" (")[0].split("</summary>")[-1] for x in line.split(" · ")[0].split(", ")] == exact
    bare = tmp_path / "bare"
    shutil.copytree(dataset.root, bare, ignore=shutil.ignore_patterns("index"))
    assert main(["report", str(bare), "--out", str(tmp_path / "r2.html")]) == 0
    assert "nbrs" not in (tmp_path / "r2.html").read_text()  # no index, no neighbour lines


def test_sample_says_why_the_export_dropped_it(dataset, tmp_path):
    from curate.search.searcher import Searcher

    keys, _, _ = embeddings(dataset)
    clip = {r["key"]: r["clip_score"] for s in dataset.done_shards("score")
            for r in pq.read_table(dataset.signals("score", s)).to_pylist() if r["scored"]}
    cut = float(np.median(list(clip.values())))
    out = tmp_path / "exp"
    assert main(["export", str(dataset.root), "--out", str(out), "--where", f"clip_score > {cut}",
                 "--write-dropped"]) == 0
    s = Searcher(dataset.root, export_dir=out)
    try:
        low = next(k for k in keys if clip[k] <= cut)
        high = next(k for k in keys if clip[k] > cut)
        v = s.sample(low)["export"]
        assert v["decision"] == "dropped" and "clip_score" in v["reason"]
        assert s.sample(high)["export"]["decision"] == "kept"
    finally:
        s.close()


def test_index_a_named_scorer(dataset, tmp_path, capsys):
    """`curate score --name alt` writes signals/alt/ and its own manifest entry; `index --scorer alt` indexes it
    and text queries use alt's model (here: the same tiny config, so the same vectors as `score`)."""
    ds = DatasetDir.at(tmp_path / "named")
    shutil.copytree(dataset.root, ds.root, ignore=shutil.ignore_patterns("index"))
    cfg = json.loads(ds.manifest.read_text())["stages"]["score"]["inputs"]["model"]["config_path"]
    assert main(["score", str(ds.root), "--name", "alt", "--model", cfg, "--pretrained", "none",
                 "--loader-workers", "0", "--no-progress"]) == 0
    assert main(["index", str(ds.root), "--scorer", "alt", "--redo", "--no-progress"]) == 0  # the copy recorded "score"
    meta = json.loads((ds.root / "index" / "index.json").read_text())
    assert meta["scorer"] == "alt" and set(meta["modalities"]) == {"image"}  # alt saved no text embeddings
    keys, img, captions = embeddings(dataset)
    _, txt, _ = embeddings(dataset, ".txt_emb.npy")
    target = keys.index(next(k for k in keys if captions[k] == caption(1)))
    hits = search_json(ds, capsys, caption(1), "-k", "3")["queries"][0]["hits"]
    order = np.argsort(-(img @ txt[target]), kind="stable")[:3]
    assert [h["key"] for h in hits] == [keys[i] for i in order]


def rrf_order(lists: list[np.ndarray], ids: dict[str, int], keys: list[str], exclude: str) -> list[str]:
    """Reciprocal rank fusion by brute force: each similarity vector ranked (1 = best), 1/(60 + rank)
    summed, ties to the lower index id, `exclude` left out after ranking (as the searcher does)."""
    score = np.zeros(len(keys))
    for sims in lists:
        ranks = np.empty(len(keys))
        ranks[np.argsort(-sims, kind="stable")] = np.arange(1, len(keys) + 1)
        score += 1.0 / (60 + ranks)
    order = sorted(range(len(keys)), key=lambda i: (-score[i], ids[keys[i]]))
    return [keys[i] for i in order if keys[i] != exclude]


def test_both_modalities_fuse_image_and_caption_hits_by_reciprocal_rank(dataset, capsys):
    ds = dataset
    keys, img, _ = embeddings(ds)
    _, txt, _ = embeddings(ds, ".txt_emb.npy")
    ids = {k: i for i, k in enumerate(pq.read_table(ds.root / "index" / "ids.parquet")["key"].to_pylist())}
    # a key query: its image vector against the image index, its caption vector against the caption index
    doc = search_json(ds, capsys, "--key", keys[3], "-k", "6", "--modality", "both")
    hits = doc["queries"][0]["hits"]
    assert [h["key"] for h in hits] == rrf_order([img @ img[3], txt @ txt[3]], ids, keys, keys[3])[:6]
    assert doc["modality"] == "both" and all(h["score"] > 0 for h in hits)
    first = keys.index(hits[0]["key"])
    assert hits[0]["scores"]["image"] == pytest.approx(float(img[first] @ img[3]), abs=2e-3)
    assert hits[0]["scores"]["text"] == pytest.approx(float(txt[first] @ txt[3]), abs=2e-3)
    # --where still applies to fused hits
    clip = {r["key"]: r["clip_score"] for s in ds.done_shards("score") for r in pq.read_table(ds.signals("score", s)).to_pylist()}
    cut = float(np.median([clip[k] for k in keys]))
    doc = search_json(ds, capsys, "--key", keys[3], "-k", "4", "--modality", "both", "--where", f"clip_score > {cut}")
    want = [k for k in rrf_order([img @ img[3], txt @ txt[3]], ids, keys, keys[3]) if clip[k] > cut][:4]
    assert [h["key"] for h in doc["queries"][0]["hits"]] == want


def test_text_queries_as_prompt_ensembles(dataset, capsys, tmp_path):
    """--templates: the query's vector is the renormalised mean of its prompts' vectors."""
    from curate.search.searcher import Searcher

    ds = dataset
    keys, img, _ = embeddings(ds)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# two prompts\na photo of {c}.\n{c} on a mat\n")
    s = Searcher(ds.root)
    try:
        each = s.text_vectors(["a photo of cat.", "cat on a mat"])
    finally:
        s.close()
    vec = each.mean(axis=0)
    vec /= np.linalg.norm(vec)
    doc = search_json(ds, capsys, "cat", "-k", "5", "--templates", str(prompts))
    order = np.argsort(-(img @ vec), kind="stable")[:5]
    assert [h["key"] for h in doc["queries"][0]["hits"]] == [keys[i] for i in order]
    assert doc["templates"] == str(prompts)
    plain = search_json(ds, capsys, "cat", "-k", "5")
    assert [h["score"] for h in plain["queries"][0]["hits"]] != [h["score"] for h in doc["queries"][0]["hits"]]
    assert main(["search", str(ds.root), "cat", "--templates", "no-such-set"]) == 2


def test_api_offers_both_modalities(served, dataset):
    status, _, body = get(f"{served}/api/info")
    assert status == 200 and json.loads(body)["modalities"] == ["image", "text", "both"]
    status, _, body = get(f"{served}/api/search?q=cat&k=3&modality=both")
    hits = json.loads(body)["hits"]
    assert status == 200 and len(hits) == 3 and set(hits[0]["scores"]) == {"image", "text"}


# --- the row store, --where allow-lists and per-query-kind tuning --------------------------------------


def samples_rows(ds: DatasetDir) -> dict[str, dict]:
    """Every sample's HIT_COLUMNS straight from the ledger and score files (what the samples view joins)."""
    from curate.search.rowstore import HIT_COLUMNS

    out: dict[str, dict] = {}
    for shard in ds.shards():
        for r in pq.read_table(ds.ledger(shard)).to_pylist():
            out[r["key"]] = {c: r[c] for c in HIT_COLUMNS if c in r}
    for shard in ds.done_shards("score"):
        for r in pq.read_table(ds.signals("score", shard)).to_pylist():
            out[r["key"]].update({c: r[c] for c in HIT_COLUMNS if c in r})
    return out


def test_row_store_holds_each_ids_row_in_id_order(dataset):
    """rows.arrow: row i is index id i's sample (key from ids.parquet), with the same caption, url and signals
    as the ledger and score files; RowStore.rows answers any ids in the order asked, across batches."""
    from curate.search import rowstore
    from curate.search.rowstore import RowStore

    ids = pq.read_table(dataset.root / "index" / "ids.parquet")["key"].to_pylist()
    truth = samples_rows(dataset)
    store = RowStore(dataset.root / "index" / "rows.arrow")
    try:
        assert store.rows_count == len(ids) and {"caption", "url", "status", "clip_score"} <= set(store.columns)
        order = [7, 0, 39, 7, 12]
        for i, row in zip(order, store.rows(order), strict=True):
            assert row["key"] == ids[i]
            for c in store.columns:
                assert row[c] == pytest.approx(truth[ids[i]][c]) if isinstance(row[c], float) else row[c] == truth[ids[i]][c]
        # each row knows where its image lies in its shard's tar: the bytes there are the sample's image
        from curate.io.shards import iter_samples

        images = {smp["key"]: smp["image"] for shard in dataset.shards() for smp in iter_samples(dataset.shard_tar(shard))}
        shards = pq.read_table(dataset.root / "index" / "ids.parquet")["shard"].to_pylist()
        for i, row in enumerate(store.rows(list(range(N_IMAGES)))):
            with open(dataset.shard_tar(shards[i]), "rb") as fh:
                fh.seek(row["image_offset"])
                assert fh.read(row["image_size"]) == images[ids[i]]
    finally:
        store.close()
    meta = json.loads((dataset.root / "index" / "rows.json").read_text())
    assert meta["rows"] == len(ids) and meta["batch_rows"] == rowstore.ROW_BATCH


def test_row_store_batches_are_addressable_by_id(dataset, tmp_path, monkeypatch):
    """With batches of 16 rows the 40 ids span three batches; every id's row is still its own."""
    from curate.search import rowstore

    monkeypatch.setattr(rowstore, "ROW_BATCH", 16)
    wd = tmp_path / "index"
    wd.mkdir()
    shutil.copy(dataset.root / "index" / "ids.parquet", wd / "ids.parquet")
    rowstore.write_row_store(dataset, wd, N_IMAGES)
    store = rowstore.RowStore(wd / "rows.arrow")
    try:
        assert [b.num_rows for b in store._batches] == [16, 16, 8]
        ids = pq.read_table(wd / "ids.parquet")["key"].to_pylist()
        assert [r["key"] for r in store.rows(list(range(N_IMAGES))[::-1])] == ids[::-1]
    finally:
        store.close()


def add_signal(ds: DatasetDir, table: str, values: dict[str, int]) -> None:
    """A new signal table (one column `tag`) with done markers: the samples view gains column <table>_tag."""
    for shard in ds.done_shards("score"):
        keys = [r["key"] for r in pq.read_table(ds.signals("score", shard), columns=["key"]).to_pylist()]
        path = ds.signals(table, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"key": keys, "tag": [values.get(k, 0) for k in keys]}), path)
        ds.marker(table, shard).parent.mkdir(parents=True, exist_ok=True)
        ds.marker(table, shard).write_text(json.dumps({"shard": shard}))


def test_where_is_an_allow_list_and_a_stale_store_falls_back(dataset, tmp_path, capsys, caplog):
    """--where on a signal written after the index: the allow-list is evaluated once and cached; the row
    store is stale, so hits come from the samples view (with a warning) until `curate index` refreshes it."""
    from curate.search.searcher import Query, Searcher

    ds = DatasetDir.at(tmp_path / "copy")
    shutil.copytree(dataset.root, ds.root, ignore=shutil.ignore_patterns("allow"))  # other tests' cached clauses
    keys, img, _ = embeddings(ds)
    tagged = {k: 1 for k in keys[::3]}
    add_signal(ds, "extra", tagged)
    exact = [k for k in (keys[i] for i in np.argsort(-(img @ img[4]), kind="stable")) if k in tagged and k != keys[4]]
    s = Searcher(ds.root, where="extra_tag = 1")
    try:
        assert s.store is None and "older than" in caplog.text
        hits = s.query(Query("key", keys[4]), k=5)
        assert [h["key"] for h in hits] == exact[:5] and all(h["caption"] for h in hits)
        assert int(s.allowed.sum()) == len(tagged)
    finally:
        s.close()
    cached = list((ds.root / "index" / "allow").glob("*.npy"))
    assert len(cached) == 1
    bits = np.unpackbits(np.load(cached[0]), count=N_IMAGES, bitorder="little").astype(bool)
    ids = pq.read_table(ds.root / "index" / "ids.parquet")["key"].to_pylist()
    assert {ids[i] for i in np.flatnonzero(bits)} == set(tagged)
    # a rerun of the index stage has no shard to redo, and rewrites only the stale row store
    capsys.readouterr()
    assert main(["index", str(ds.root), "--no-progress"]) == 0
    assert "0 shard(s) done, 3 already done" in capsys.readouterr().err
    doc = search_json(ds, capsys, "--key", keys[4], "-k", "5", "--where", "extra_tag = 1")
    assert [h["key"] for h in doc["queries"][0]["hits"]] == exact[:5]
    s = Searcher(ds.root)
    try:
        assert s.store is not None
    finally:
        s.close()


def test_weak_probes_sit_at_the_asked_cosine():
    from curate.search.build import probe_steps, weak_probes

    x = np.random.default_rng(0).standard_normal((50, 64)).astype(np.float32)
    p = weak_probes(x, 0.3, seed=1)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert np.allclose(np.linalg.norm(p, axis=1), 1, atol=1e-5)
    assert np.allclose(np.sum(p * unit, axis=1), 0.3, atol=1e-5)
    assert probe_steps(64) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64] and probe_steps(1) == [1]
    assert probe_steps(100) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 100]


def test_ivf_tuned_per_query_kind_and_text_queries_use_the_text_setting(dataset, tmp_path, capsys):
    """index.json keeps a setting per modality and query kind (captions tune text queries here); a text query
    is searched with the text setting, a key query with the image one."""
    import faiss

    from curate.search.searcher import Searcher

    ds = DatasetDir.at(tmp_path / "ivf")
    shutil.copytree(dataset.root, ds.root)
    assert main(["index", str(ds.root), "--kind", "ivf-fp16", "--nlist", "8", "--redo", "--no-progress"]) == 0
    path = ds.root / "index" / "index.json"
    meta = json.loads(path.read_text())
    for m in ("image", "text"):
        search = meta["modalities"][m]["search"]
        assert set(search) == {"image", "text"} and all(v["recall"] >= 0.97 for v in search.values())
    assert "caption" in meta["modalities"]["image"]["search"]["text"]["source"]
    # pin the settings apart: text queries probe every list (exact), image/key queries one list
    meta["modalities"]["image"]["search"]["text"]["nprobe"] = 8
    meta["modalities"]["image"]["search"]["image"]["nprobe"] = 1
    path.write_text(json.dumps(meta))
    keys, img, captions = embeddings(ds)
    _, txt, _ = embeddings(ds, ".txt_emb.npy")
    target = keys.index(next(k for k in keys if captions[k] == caption(2)))
    exact = [keys[i] for i in np.argsort(-(img @ txt[target]), kind="stable")[:8]]
    index = faiss.read_index(str(ds.root / "index" / "image.faiss"))
    ids = pq.read_table(ds.root / "index" / "ids.parquet")["key"].to_pylist()
    _, one = index.search(txt[target:target + 1], 8, params=faiss.SearchParametersIVF(nprobe=1))
    assert [ids[i] for i in one[0] if i >= 0] != exact  # one list is not enough for this query
    doc = search_json(ds, capsys, caption(2), "-k", "8")
    assert [h["key"] for h in doc["queries"][0]["hits"]] == exact
    s = Searcher(ds.root)
    try:
        assert s.nprobe("image", "image") == 1 and s.nprobe("image", "text") == 8
    finally:
        s.close()


def test_ivf_pq_hits_are_reranked_by_exact_cosine(tmp_path):
    """A compressed (IVF-PQ) index: the index's candidates are reranked with the stored float16 embeddings,
    so hit scores are the exact cosines and text-like queries reach the tuned recall against brute force."""
    import importlib.util

    from curate.search import build
    from curate.search.build import weak_probes
    from curate.search.searcher import Searcher

    bench = Path(__file__).resolve().parents[1] / "bench" / "synth_scored.py"
    spec = importlib.util.spec_from_file_location("synth_scored", bench)
    synth = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(synth)
    ds = DatasetDir.at(tmp_path / "pq")
    synth.generate(ds.root, 3000, rows_per_shard=1000)
    assert main(["index", str(ds.root), "--kind", "ivf-pq", "--memory-budget", "200K", "--nlist", "8",
                 "--no-progress"]) == 0
    meta = json.loads((ds.root / "index" / "index.json").read_text())
    assert meta["factory"] == "IVF8,PQ32" and meta["refine"] > 10
    keys = pq.read_table(ds.root / "index" / "ids.parquet")["key"].to_pylist()
    emb = np.concatenate([np.load(ds.signals("score", s, ".img_emb.npy")) for s in ds.done_shards("score")])
    emb = emb.astype(np.float32)
    q = weak_probes(emb[[5, 1500, 2999]], 0.3, seed=3)
    # tuning's exact cosines of candidate ids (a row per query, -1 where the index had fewer), read a
    # shard at a time in chunks smaller than one shard's candidates
    plan = json.loads((ds.root / "index" / "plan.json").read_text())
    idmap = build.IdMap(ds.root / "index" / "ids.parquet", plan["tasks"])
    cand = np.random.default_rng(4).integers(0, 3000, size=(3, 700))
    cand[1, 650:] = -1
    sims = build.exact_sims(ds, "score", "image", idmap, q, cand, chunk=256, queries=2)
    want = np.where(cand >= 0, np.einsum("qd,qkd->qk", q, emb[np.maximum(cand, 0)]), -np.inf)
    assert np.allclose(sims, want, atol=1e-5)
    s = Searcher(ds.root)
    try:
        found = 0.0
        for v in q:
            hits = s.search(v, 10, kind="text")
            exact = emb @ v
            got = np.array([exact[keys.index(h["key"])] for h in hits])
            assert [h["score"] for h in hits] == pytest.approx(got.tolist(), abs=1e-4)  # exact, not PQ's
            found += float(np.mean(got >= np.sort(exact)[-10] - 1e-4))
        assert found / len(q) >= meta["modalities"]["image"]["search"]["text"]["recall"] - 0.1
        assert all(h["caption"].startswith("a photo number") for h in hits)
        ids = np.random.default_rng(5).integers(0, 3000, 500)
        s._max_open = 2  # read in batches of two files, each batch's files kept open through its reads
        assert np.array_equal(s.vectors_of("image", ids), emb[ids])
    finally:
        s.close()
    path = ds.signals("score", ds.done_shards("score")[1], ".img_emb.npy")
    np.save(path, np.load(path).astype(np.float32))  # one shard's rows twice as wide: read apart
    s = Searcher(ds.root)
    try:
        assert np.array_equal(s.vectors_of("image", ids), emb[ids])
    finally:
        s.close()


def test_tuning_stops_at_a_recall_plateau_and_takes_its_cheapest_nprobe():
    """A compressed index whose codes cap recall below the target: tuning stops once more lists stop helping
    and picks the smallest nprobe within 0.002 of the best recall seen, not every list."""
    import faiss

    from curate.search.build import PLATEAU_GAIN, probe_steps, tune_nprobe

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((200, 32)).astype(np.float32)
    x = np.repeat(centres, 40, axis=0) + 0.3 * rng.standard_normal((8000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # tight clusters: the neighbours sit in a few lists
    index = faiss.index_factory(32, "IVF128,PQ4", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    q = x[::80] + 0.1 * rng.standard_normal((100, 32)).astype(np.float32)
    gt = -np.sort(-(q @ x.T), axis=1)[:, :10]

    def true_sims(ids):
        return np.where(ids >= 0, np.einsum("qkd,qd->qk", x[np.maximum(ids, 0)], q), -np.inf)

    nprobe, rec, curve, depth = tune_nprobe(index, 128, q, gt, 1.0, true_sims)
    best = max(r for _, r in curve)
    assert rec < 1.0 and len(curve) < len(probe_steps(128))  # stopped early
    assert nprobe == next(p for p, r in curve if r >= best - PLATEAU_GAIN) and rec >= best - PLATEAU_GAIN
    assert depth == 0  # no rerank asked


def test_auto_nlist_is_about_four_sqrt_n_with_enough_training_rows_per_list():
    """Lists finer than sqrt(N) (text queries need fewer vectors scanned for their recall), a power of two,
    never fewer than ~39 rows a list (k-means' minimum) and capped (training cost)."""
    from curate.search.build import MAX_AUTO_NLIST, IndexConfig, auto_nlist, choose_index

    assert auto_nlist(1_000_000) == 4096 and auto_nlist(100_000) == 1024
    for n in (2, 50, 1000, 40_000, 250_000, 3_000_000, 10_000_000, 10 ** 9):
        nlist = auto_nlist(n)
        assert nlist & (nlist - 1) == 0 or nlist == n // 39, n  # a power of two unless the row floor binds
        assert 1 <= nlist <= max(1, n // 39) and nlist <= MAX_AUTO_NLIST
        assert nlist >= min(MAX_AUTO_NLIST, n // 39, 2 * 2 ** int(np.log2(np.sqrt(n)))), n
    assert choose_index(10_000_000, 512, IndexConfig())["factory"] == f"IVF{MAX_AUTO_NLIST},PQ64"


def test_two_level_coarse_training_is_close_to_full_kmeans_and_parts_are_codes(monkeypatch):
    """From TWO_LEVEL_FROM lists the coarse centroids come from two-level k-means (cheap at 8,192 lists): they
    fit the data almost as well as one k-means over all lists, the PQ encoder is trained without polysemous
    ordering, and an index merged from per-shard codes (the parts) answers as one built by faiss's add."""
    import faiss

    from curate.search import build

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((150, 32))
    x = centres[rng.integers(150, size=12_000)] + 0.5 * rng.standard_normal((12_000, 32))
    x16 = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    x32 = x16.astype(np.float32)
    monkeypatch.setattr(build, "TWO_LEVEL_FROM", 64)
    index = faiss.index_factory(32, "IVF128,PQ8", faiss.METRIC_INNER_PRODUCT)
    assert build.train_index(index, lambda: x16, 128, seed=0) == "two-level k-means"
    assert not index.do_polysemous_training and faiss.extract_index_ivf(index).quantizer.ntotal == 128
    full = faiss.Kmeans(32, 128, niter=20, spherical=True, seed=0)
    full.train(x32)

    def fit(c):  # mean cosine of each row to its nearest centroid
        flat = faiss.IndexFlatIP(32)
        flat.add(np.ascontiguousarray(c, np.float32))
        return float(flat.search(x32, 1)[0].mean())

    two = faiss.extract_index_ivf(index).quantizer.reconstruct_n(0, 128)
    assert np.allclose(np.linalg.norm(two, axis=1), 1, atol=1e-4) and fit(two) >= fit(full.centroids) - 0.02
    merged, added = faiss.clone_index(index), faiss.clone_index(index)
    parts = [(part, index.sa_encode(x32[part])) for part in np.array_split(np.arange(len(x32)), 3)]
    build.reserve_lists(merged, (codes for _, codes in parts))  # room made, every list still empty
    assert merged.ntotal == 0 and all(merged.invlists.list_size(no) == 0 for no in range(128))
    for part, codes in parts:  # what each shard task writes, merged in id order
        merged.add_sa_codes(codes, part.astype(np.int64))
    added.add(x32)
    merged.nprobe = added.nprobe = 16
    assert [merged.invlists.list_size(no) for no in range(128)] == [added.invlists.list_size(no) for no in range(128)]
    assert merged.ntotal == added.ntotal and np.array_equal(merged.search(x32[:50], 10)[1],
                                                            added.search(x32[:50], 10)[1])


def test_tuning_picks_a_rerank_depth_when_codes_cannot_order_the_top():
    """IVF-PQ: with coarse codes the top k by code is not the exact top k; tuning measures each rerank depth at
    each nprobe and keeps the cheapest pair that reaches the target, which here needs the deeper rerank."""
    import faiss

    from curate.search.build import tune_nprobe

    rng = np.random.default_rng(1)
    x = rng.standard_normal((6000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = faiss.index_factory(32, "IVF16,PQ4", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    q = x[:80] + 0.2 * rng.standard_normal((80, 32)).astype(np.float32)
    gt = -np.sort(-(q @ x.T), axis=1)[:, :10]

    def true_sims(ids):
        return np.where(ids >= 0, np.einsum("qkd,qd->qk", x[np.maximum(ids, 0)], q), -np.inf)

    nprobe, rec, curve, depth = tune_nprobe(index, 16, q, gt, 0.9, true_sims, (10, 300), 6000 / 16)
    assert depth == 300 and rec >= 0.9 and curve[-1][1] >= 0.9
    faiss.extract_index_ivf(index).nprobe = nprobe
    shallow = -np.sort(-true_sims(index.search(q, 10)[1]), axis=1)
    assert float(np.mean(shallow >= gt[:, -1:] - 1e-4)) < 0.8  # the codes alone miss the exact top 10
