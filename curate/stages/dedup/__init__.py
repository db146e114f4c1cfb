"""Stage "dedup" as a package: `config` (the config and the helpers every phase shares), `phases` (the map/reduce
task phases), `threshold` (--threshold auto's calibration), `core` (the numeric core: spherical k-means, the
bounded pair search and SemDeDup's keep rule, on numpy/faiss or torch) and `stage` (the Stage the runner
drives). Importing the package gives the stage and its config's names."""

from curate.stages.dedup.config import (  # noqa: F401
    DEFAULT_PHASH_DISTANCE,
    PHASES,
    PLAN_VERSION,
    WORK,
    DedupConfig,
    check_config,
    device_of,
    gather,
    groups_for,
    input_config,
    input_digest,
    overflag_warning,
    read_shard,
    work_dir,
)
from curate.stages.dedup.stage import STAGE, DedupStage  # noqa: F401
