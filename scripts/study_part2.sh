#!/usr/bin/env bash
# Budget study, part 2 (issue 29; docs/BENCHMARKS.md section 12): SmolLM2-135M at 70% unstructured, every method of
# configs/study/part2_smollm2.yaml with the library's default recipe, at 32 and 128 steps of 4 x 256 KJV tokens, then
# 512 steps for the two best at 128 (named on the command line). Resumable cell by cell: each method is one sweep
# call into outputs/study/part2-STEPS, whose results.json is copied to docs/study/part2-STEPS.json (committed with
# --commit) after every cell and seeded back from there on a fresh clone, so a stopped run loses at most one cell.
#   bash scripts/study_part2.sh 32 [--commit]                      # every method of the config
#   bash scripts/study_part2.sh 512 [--commit] METHOD [METHOD ...]  # only these
#   bash scripts/study_part2.sh 128 [--commit] --seed 43 METHOD ...   # another seed (default 42): its own folder and file
# Run it alone on the machine, under the heavy-job lock: flock /tmp/pilot.lock bash scripts/study_part2.sh ...
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:?usage: study_part2.sh STEPS [--commit] [--seed N] [METHOD ...]}
shift
commit=
if [ "${1:-}" = --commit ]; then commit=1; shift; fi
seed=() name=part2-$steps
if [ "${1:-}" = --seed ]; then seed=(--seed "${2:?--seed needs a number}"); name+=-seed$2; shift 2; fi
config=configs/study/part2_smollm2.yaml
out=outputs/study/$name
kept=docs/study/$name.json
if [ $# -gt 0 ]; then methods=("$@"); else
  read -r -a methods <<< "$(.venv/bin/python -c "import sys, yaml; print(*yaml.safe_load(open(sys.argv[1]))['methods'])" "$config")"
fi
mkdir -p "$out"
if [ -f "$kept" ] && [ ! -f "$out/results.json" ]; then cp "$kept" "$out/results.json"; fi
for method in "${methods[@]}"; do
  echo "== $method at $steps steps ($(date +%H:%M))"
  .venv/bin/pilot-hf sweep --config "$config" --methods "$method" --max_steps "$steps" "${seed[@]}" --output_dir "$out"
  if ! cmp -s "$out/results.json" "$kept"; then
    cp "$out/results.json" "$kept"
    if [ -n "$commit" ]; then
      git add "$kept" && git commit -q -m "budget study part 2: $method at $steps steps${seed[1]:+, seed ${seed[1]}}" -- "$kept"
    fi
  fi
done
