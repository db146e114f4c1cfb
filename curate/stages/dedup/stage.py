"""Stage "dedup": exact (sha256), near-duplicate (SemDeDup over image embeddings) and optional perceptual-hash
duplicates, SemDeDup's keep rule, and contamination against an evaluation set, as map/reduce task phases.

    driver   sample rows by a hash of (key, seed), train spherical k-means        -> _work/dedup/centroids.npy
    assign   one task per score shard: nearest `probes` clusters of each row;      -> meta/{shard}.parquet,
             per-cluster-group buckets (embedding, key, keep priority)               bucket/{shard}.npy + offsets
             (+ with --phash, one task per tar: perceptual hashes)                  phash/{shard}.parquet
    driver   GROUP BY sha256 (and pHash with --phash) in DuckDB (Spark SQL on Spark) -> exact_edges.parquet
    collapse one task per shard: a mask of its exact copies, its exact/pHash rows  -> collapse/{shard}.*
    pairs    one task per group of clusters, reading its slice of each bucket less the exact copies: for each
             row at most --pairs-per-row higher-priority partners above the threshold, and the nearest
             neighbour                                                           -> pairs/{g}.edges.npy, .nn.npy
    resolve  rounds of one task per shard: SemDeDup's rule, a row settled once its partners are  -> resolve/rNNN/
    decide   one task per shard: its group heads (kept rows some drop names, read from its uid range of every
             shard's last-round `by` file); the driver sums their counts -> decide/{shard}.npy, summary.json
    write    one task per source shard: its signal table (a copy takes its representative's decision), marker
             last                                                                -> signals/dedup/{shard}.parquet

The driver holds the training sample, the centroids and per-shard lists; no step holds all embeddings.
Rows are identified by key for every decision and tie, so shard order and placement change nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from curate.config import output_fields
from curate.io.atomic import read_json, write_json
from curate.io.layout import DatasetDir, task_id
from curate.stages.base import Stage
from curate.stages.dedup import phases as ph
from curate.stages.dedup.config import (
    PHASES,
    PLAN_VERSION,
    DedupConfig,
    check_config,
    device_of,
    input_config,
    input_digest,
    overflag_warning,
    work_dir,
)

log = logging.getLogger(__name__)


class DedupStage(Stage):
    name = "dedup"
    config_cls = DedupConfig
    repeated_phases = ("resolve",)  # planned again after each round until a round leaves nothing undecided

    def validate(self, cfg: DedupConfig, ds: DatasetDir) -> None:
        check_config(cfg)

    def fingerprint_inputs(self, cfg: DedupConfig, ds: DatasetDir) -> dict[str, Any]:
        extra = {"dataset": input_config(ds, cfg.scorer)}
        if cfg.against:
            extra["against"] = input_config(DatasetDir.at(cfg.against), cfg.scorer)
        return extra

    def phases(self, cfg: DedupConfig, ds: DatasetDir) -> tuple[str, ...]:
        return PHASES

    def plan(self, cfg: DedupConfig, ds: DatasetDir) -> list[dict[str, Any]]:
        return self.plan_phase(cfg, ds, "assign")

    def plan_phase(self, cfg: DedupConfig, ds: DatasetDir, phase: str) -> list[dict[str, Any]]:
        check_config(cfg)
        if phase == "assign":
            plan = self._plan(cfg, ds)
            tasks = [{"task": f"assign.{s}", "kind": "assign", "source": s, "ordinal": o}
                     for o, s in enumerate(plan["shards"])]
            if cfg.phash:
                tasks += [{"task": f"phash.{s}", "kind": "phash", "source": s} for s in plan["shards"]]
        else:
            plan = read_json(work_dir(ds) / "plan.json")
            if phase == "write":  # the pair tasks' offsets, gathered into one file (one open per write task)
                groups = [f"{g:05d}" for g in range(len(plan["group_bounds"]) - 1)]
                ph.gather_offsets(work_dir(ds) / "pairs", groups, ".nn_offsets.npy")
                # the counts, from the decide tasks' small files
                ph.decide_summary(ds, plan, ph.last_round(ds, plan))
            if phase == "collapse":
                tasks = [{"task": f"collapse.{s}", "kind": "collapse", "source": s, "ordinal": o}
                         for o, s in enumerate(plan["shards"])]
                pending = not all(ph.task_done(ds, t) for t in tasks)
                if pending and not (work_dir(ds) / "exact_edges.parquet").exists():
                    ph.exact_edges(cfg, ds, plan)  # on the driver: a GROUP BY in DuckDB or Spark SQL
            elif phase == "pairs":
                b = plan["group_bounds"]
                tasks = [{"task": f"pairs.{g:05d}", "kind": "pairs", "group": g, "lo": b[g], "hi": b[g + 1]}
                         for g in range(len(b) - 1)]
            elif phase == "resolve":
                tasks = ph.resolve_tasks(ds, plan)
            elif phase == "decide":
                r = ph.last_round(ds, plan)
                tasks = [{"task": f"decide.{s}", "kind": "decide", "round": r, "source": s, "ordinal": o}
                         for o, s in enumerate(plan["shards"])]
            else:
                tasks = [{"shard": s, "kind": "write", "source": s, "ordinal": o}
                         for o, s in enumerate(plan["shards"])]
        # a marker without its output (deleted work file) means the task must run again
        for t in tasks:
            if not ph.task_done(ds, t):
                ds.marker(self.name, task_id(t)).unlink(missing_ok=True)
        return tasks

    def _plan(self, cfg: DedupConfig, ds: DatasetDir) -> dict[str, Any]:
        wd = work_dir(ds)
        digest = {"inputs": input_digest(ds, cfg.scorer), "config": output_fields(cfg), "version": PLAN_VERSION}
        if cfg.against:
            digest["against"] = input_digest(DatasetDir.at(cfg.against), cfg.scorer)
        plan_path = wd / "plan.json"
        if plan_path.exists() and read_json(plan_path).get("digest") == digest:
            return read_json(plan_path)
        # another (or a half-written) plan: none of its task outputs may be reused
        ds.discard(self.name)
        plan = ph.build_plan(cfg, ds, digest, device_of(cfg))
        write_json(plan_path, plan)  # last: its presence says every work file above is complete
        return plan

    def run_shard(self, cfg: DedupConfig, ds: DatasetDir, task: dict[str, Any]) -> dict[str, Any]:
        run = {"assign": ph.run_assign, "phash": ph.run_phash, "collapse": ph.run_collapse, "pairs": ph.run_pairs,
               "resolve": ph.run_resolve, "decide": ph.run_decide, "write": ph.run_write}[task["kind"]]
        return run(cfg, ds, task)

    def finalize(self, cfg: DedupConfig, ds: DatasetDir) -> dict[str, Any]:
        wd = work_dir(ds)
        if not (wd / "plan.json").exists():
            return {}
        plan = read_json(wd / "plan.json")
        missing = [s for s in plan["shards"] if not ds.marker(self.name, s).exists()]
        if missing or not (wd / "decide" / "summary.json").exists():
            return {"incomplete_tasks": len(missing)}
        counts: dict[str, Any] = {"rows": plan["rows"], "clusters": plan["k"], "device": plan["device"],
                                  "threshold": plan["threshold"]}
        if plan.get("calibration"):
            counts["threshold_calibration"] = plan["calibration"]
        decide = read_json(wd / "decide" / "summary.json")
        per_shard = [read_json(ds.stats(self.name, s)) for s in plan["shards"]]
        counts["exact_duplicates"] = sum(c.get("exact_duplicates", 0) for c in per_shard)  # rows sharing a sha256
        counts["near_duplicate_pairs"] = decide["near_duplicate_pairs"]
        counts["near_pairs_without_phash_match"] = decide["near_pairs_without_phash_match"]
        counts["near_duplicates"] = sum(c.get("near_duplicates", 0) for c in per_shard)  # rows in a near pair
        counts["groups"] = decide["groups"]
        counts["duplicates"] = sum(c.get("duplicates", 0) for c in per_shard)
        counts["drops_by_evidence"] = {name: sum(c.get("drops_by_evidence", {}).get(name, 0) for c in per_shard)
                                       for name in ("exact", "phash", "near")}
        counts["resolve_rounds"] = decide["resolve_rounds"]
        # rows kept although they had more partners than --pairs-per-row, all listed ones dropped (0: exact rule)
        counts["kept_beyond_pairs_per_row"] = decide.get("kept_beyond_pairs_per_row", 0)
        if cfg.phash:
            st = [read_json(ds.stats(self.name, f"phash.{s}")) for s in plan["shards"]
                  if ds.stats(self.name, f"phash.{s}").exists()]
            counts["phash_hashed"] = sum(x.get("hashed", 0) for x in st)
            counts["phash_failed"] = sum(x.get("phash_failed", 0) for x in st)
        warning = overflag_warning(counts, cfg)
        if warning:
            counts["overflag_warning"] = warning
            log.warning("dedup: %s", warning)
        if cfg.against:
            counts["eval_contaminated"] = sum(c.get("eval_contaminated", 0) for c in per_shard)
        return counts

    def inputs(self, cfg: DedupConfig) -> dict[str, Any]:
        return {"against": cfg.against} if cfg.against else {}

STAGE = DedupStage()
