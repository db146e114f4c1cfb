"""URL list readers: every format (plain and .gz), folders, presets, and errors naming file and column."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate.errors import InputError
from curate.io.inputs import PRESETS, InputSpec, check_columns, iter_input

URLS = ["http://a.example/1.jpg", "http://b.example/2.jpg", "http://c.example/3.jpg"]
CAPS = ["one, with comma", 'two "quoted"', "three"]


def read_input(spec: InputSpec) -> pa.Table:
    """The whole URL list as one table (download streams it in batches with iter_input)."""
    return pa.concat_tables(iter_input(spec))


def write(path, fmt: str) -> None:
    if fmt == "parquet":
        pq.write_table(pa.table({"url": URLS, "caption": CAPS, "uid": [1, 2, 3]}), path)
        return
    if fmt in ("csv", "tsv"):
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf, delimiter="," if fmt == "csv" else "\t", lineterminator="\n")
        w.writerow(["url", "caption", "uid"])
        for i, (u, c) in enumerate(zip(URLS, CAPS, strict=True)):
            w.writerow([u, c.replace('"', "'") if fmt == "tsv" else c, i + 1])
        text = buf.getvalue()
    elif fmt == "json":
        text = json.dumps([{"url": u, "caption": c, "uid": i + 1} for i, (u, c) in enumerate(zip(URLS, CAPS, strict=True))])
    elif fmt == "jsonl":
        text = "".join(json.dumps({"url": u, "caption": c, "uid": i + 1}) + "\n"
                       for i, (u, c) in enumerate(zip(URLS, CAPS, strict=True)))
    else:
        text = "\n".join(URLS) + "\n\n"
    data = text.encode()
    if str(path).endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "json", "jsonl", "txt"])
@pytest.mark.parametrize("gz", [False, True])
def test_every_format(tmp_path, fmt, gz):
    if fmt == "parquet" and gz:
        pytest.skip("parquet compresses itself")
    path = tmp_path / (f"list.{fmt}" + (".gz" if gz else ""))
    write(path, fmt)
    spec = InputSpec(str(path), caption_col=None if fmt == "txt" else "caption",
                     keep_cols=() if fmt == "txt" else ("uid",))
    check_columns(spec)
    t = read_input(spec)
    assert t.column("url").to_pylist() == URLS
    if fmt != "txt":
        got = t.column("caption").to_pylist()
        assert got[0] == CAPS[0] and got[2] == CAPS[2]
        assert t.column("uid").to_pylist() == ["1", "2", "3"]
        assert t.schema.field("uid").type == pa.string()


def test_folder_reads_files_in_sorted_order(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"url": ["http://x/2"]}), tmp_path / "in" / "b.parquet")
    pq.write_table(pa.table({"url": ["http://x/1"]}), tmp_path / "in" / "a.parquet")
    (tmp_path / "in" / "_SUCCESS").write_text("")
    assert read_input(InputSpec(str(tmp_path / "in"))).column("url").to_pylist() == ["http://x/1", "http://x/2"]


def test_fsspec_url(tmp_path):
    path = tmp_path / "l.jsonl"
    write(path, "jsonl")
    assert read_input(InputSpec(f"file://{path}")).column("url").to_pylist() == URLS


def test_cc_presets_find_the_url_column(tmp_path):
    cc3m = tmp_path / "cc3m.tsv"
    cc3m.write_text("a cat\thttp://x/cat.jpg\na dog\thttp://x/dog.jpg\n")
    cc12m = tmp_path / "cc12m.tsv"
    cc12m.write_text("http://x/cat.jpg\ta cat\n")
    for path in (cc3m, cc12m):
        p = PRESETS["cc3m"]
        t = read_input(InputSpec(str(path), p.input_format, p.url_col, p.caption_col, header=p.header))
        assert t.column("url").to_pylist()[0] == "http://x/cat.jpg"
        assert t.column("caption").to_pylist()[0] == "a cat"


@pytest.mark.parametrize("spec_kw,needle", [
    ({"url_col": "URL"}, "column 'URL' (--url-col)"),
    ({"caption_col": "TEXT"}, "column 'TEXT' (--caption-col)"),
    ({"keep_cols": ("SAMPLE_ID",)}, "column 'SAMPLE_ID' (--keep-col)"),
])
def test_missing_column_names_file_and_column(tmp_path, spec_kw, needle):
    for fmt in ("parquet", "csv", "jsonl"):
        path = tmp_path / f"l.{fmt}"
        write(path, fmt)
        with pytest.raises(InputError) as ei:
            check_columns(InputSpec(str(path), **spec_kw))
        assert needle in str(ei.value) and str(path) in str(ei.value)


def test_unreadable_inputs(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        check_columns(InputSpec(str(tmp_path / "missing.parquet")))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(InputError, match="bad.parquet"):
        check_columns(InputSpec(str(bad)))
    odd = tmp_path / "list.xyz"
    odd.write_text("x")
    with pytest.raises(InputError, match="--input-format"):
        check_columns(InputSpec(str(odd)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="folder holds no"):
        check_columns(InputSpec(str(tmp_path / "empty")))


def _bad_utf8_strings(values: list[bytes]) -> pa.Array:
    """A string array holding bytes that are not UTF-8 (as some parquet writers produce)."""
    return pa.array(values, pa.binary()).view(pa.string())


def test_invalid_utf8_and_lone_surrogates_are_repaired_per_row_with_a_code(tmp_path):
    pq.write_table(pa.table({"url": _bad_utf8_strings([b"http://a/1.jpg", b"http://a/\xff.jpg", b"http://a/3.jpg"]),
                             "caption": _bad_utf8_strings([b"ok", b"fine", b"caf\xe9"])}), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text('{"url": "http://b/1.jpg", "caption": "x\\ud800y"}\n'
                                      '{"url": "http://b/\\udfff", "caption": "ok"}\n'
                                      '{"url": "http://b/3.jpg", "caption": "\\ud83d\\ude00 pair"}\n')
    (tmp_path / "c.csv").write_bytes(b"url,caption\nhttp://c/1.jpg,na\xefve\nhttp://c/2.jpg,plain\n")
    for name, errors, caps in [
        ("a.parquet", [None, "invalid_url", "invalid_text"], ["ok", "fine", "caf\ufffd"]),
        ("b.jsonl", ["invalid_text", "invalid_url", None], ["x\ufffdy", "ok", "\U0001f600 pair"]),
        ("c.csv", ["invalid_text", None], ["na\ufffdve", "plain"]),
    ]:
        spec = InputSpec(str(tmp_path / name), caption_col="caption")
        check_columns(spec)
        t = read_input(spec)
        assert t.column("input_error").to_pylist() == errors, name
        assert t.column("caption").to_pylist() == caps, name
        msgs = [m for m in t.column("input_error_message").to_pylist() if m]
        assert all(name in m and "column '" in m for m in msgs)
        t.validate(full=True)  # every string is valid UTF-8 now
