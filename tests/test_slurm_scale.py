"""A stage with more shards than Slurm's default MaxArraySize (1001) runs from the unchanged templates as an
array of a few indices, each running many shards (shards[i::n]): download_plan.sbatch, then two indices of
download.sbatch over 1,002 one-row shards."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_jobs import SLURM, command_line, expand

from curate.cli import main
from curate.io import manifest
from curate.io.layout import DatasetDir, shard_name

MAX_ARRAY_SIZE = 1001  # Slurm's default: array indices 0..1000
SHARDS = MAX_ARRAY_SIZE + 1


@pytest.mark.slow  # 1,002 shard tasks in this process: about half a minute on 2 cores
def test_more_shards_than_max_array_size_run_as_several_per_index(tmp_path):
    inp = tmp_path / "urls.parquet"
    # ftp:// is refused before any connection (no traffic): every row still gets its ledger row
    pq.write_table(pa.table({"url": [f"ftp://127.0.0.1/{i}.jpg" for i in range(SHARDS)]}), inp)
    env = {"URL_LIST": str(inp), "DATASET": str(tmp_path / "ds"), "CURATE_ARGS": ""}
    extra = ["--samples-per-shard", "1", "--no-progress"]
    assert main(expand(command_line(SLURM / "download_plan.sbatch"), env)[1:] + extra) == 0
    count = 2
    ds = DatasetDir.at(tmp_path / "ds")
    for i in range(count):
        argv = expand(command_line(SLURM / "download.sbatch"),
                      {**env, "SLURM_ARRAY_TASK_ID": str(i), "SLURM_ARRAY_TASK_COUNT": str(count),
                       "SLURM_CPUS_PER_TASK": "1"})
        assert main(argv[1:] + extra) == 0
        done = ds.done_shards("download")
        assert len([s for s in done if int(s) % count == i]) == SHARDS // count  # many shards for one index
    assert ds.done_shards("download") == [shard_name(i) for i in range(SHARDS)]
    entry = manifest.load(ds)["stages"]["download"]
    assert entry["status"] == "complete" and entry["slices"] == {"0-of-2": "complete", "1-of-2": "complete"}
    assert entry["counts"]["rows"] == SHARDS
