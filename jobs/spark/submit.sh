#!/usr/bin/env bash
# Run any curate command (a stage or `run PIPELINE.yaml`) as a Spark application.
#
#   SPARK_MASTER=spark://head:7077 EXECUTOR_MEMORY=16g EXECUTOR_CORES=8 \
#     jobs/spark/submit.sh export /data/pool --out /data/curated --policy laion
#   SPARK_MASTER=spark://head:7077 GPUS_PER_EXECUTOR=1 GPU_PER_TASK=1 \
#     GPU_DISCOVERY_SCRIPT=/opt/spark/examples/src/main/scripts/getGpusResources.sh \
#     jobs/spark/submit.sh score /data/pool --device cuda --batch-size 512
#
# Settings (environment): SPARK_MASTER (default local[*]), DEPLOY_MODE (client), EXECUTOR_MEMORY (4g),
# EXECUTOR_CORES (4), NUM_EXECUTORS (unset: the cluster decides), DRIVER_MEMORY (4g),
# GPUS_PER_EXECUTOR / GPU_PER_TASK (unset: no GPU scheduling; a fraction such as 0.25 puts 4 tasks on a GPU),
# GPU_DISCOVERY_SCRIPT, PYTHON (the interpreter with curate installed on every node; default: this one),
# SPARK_SUBMIT (default: spark-submit on PATH, else the one pyspark carries), EXTRA_CONF ("k=v k=v"),
# TASK_MAX_FAILURES (1: curate's runner retries a failed task, 3 attempts; a larger value makes Spark retry
# inside each of those attempts, and the runner then counts each round as that many attempts).
# Dynamic allocation works as it is: curate re-reads the executors' cores every second and keeps twice
# as many tasks queued, so the cluster grows to the work (EXTRA_CONF="spark.dynamicAllocation.enabled=true ...").
# Paths must be on storage every node sees (NFS, or an fsspec URL where the stage supports it).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-$(command -v python3)}"
if [ -z "${SPARK_SUBMIT:-}" ]; then
  SPARK_SUBMIT="$(command -v spark-submit || echo "$("$PYTHON" -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')/bin/spark-submit")"
fi
[ "$#" -ge 1 ] || { echo "usage: $0 COMMAND [ARGS...]   (e.g. export DIR --out OUT)" >&2; exit 2; }

conf=(
  --conf "spark.pyspark.python=$PYTHON"
  --conf "spark.pyspark.driver.python=$PYTHON"
  --conf spark.speculation=false
  --conf spark.task.maxFailures="${TASK_MAX_FAILURES:-1}"
  --conf spark.ui.showConsoleProgress=false
)
if [ -n "${GPUS_PER_EXECUTOR:-}" ]; then
  conf+=(--conf "spark.executor.resource.gpu.amount=$GPUS_PER_EXECUTOR"
         --conf "spark.task.resource.gpu.amount=${GPU_PER_TASK:-1}")
  [ -n "${GPU_DISCOVERY_SCRIPT:-}" ] && conf+=(--conf "spark.executor.resource.gpu.discoveryScript=$GPU_DISCOVERY_SCRIPT")
fi
[ -n "${NUM_EXECUTORS:-}" ] && conf+=(--num-executors "$NUM_EXECUTORS")
for kv in ${EXTRA_CONF:-}; do conf+=(--conf "$kv"); done

exec "$SPARK_SUBMIT" \
  --master "${SPARK_MASTER:-local[*]}" \
  --deploy-mode "${DEPLOY_MODE:-client}" \
  --driver-memory "${DRIVER_MEMORY:-4g}" \
  --executor-memory "${EXECUTOR_MEMORY:-4g}" \
  --executor-cores "${EXECUTOR_CORES:-4}" \
  "${conf[@]}" \
  "$HERE/curate_job.py" "$@"
