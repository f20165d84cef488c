#!/usr/bin/env bash
# 35th session: OpenMP's spin-waiting on a 2-core machine with one core taken by another
# process. benchmarks/compare_hf_cpu.py (kiln vs transformers, 8 x 64, float32) under
# three OpenMP settings, idle and beside a busy loop, three alternating rounds.
cd "$(dirname "$0")/../../.."
out=benchmarks/results/cpu-2026-12-04-s35
for load in idle busy; do
  pid=""
  [ $load = busy ] && { python3 -c "while True: pass" & pid=$!; }
  for round in 1 2 3; do
    for v in default passive spin10k; do
      case $v in
        default) env="X=1" ;;
        passive) env="OMP_WAIT_POLICY=PASSIVE" ;;
        spin10k) env="GOMP_SPINCOUNT=10000" ;;
      esac
      env $env .venv/bin/python benchmarks/compare_hf_cpu.py --out $out/$load-$v-$round.json \
        > $out/$load-$v-$round.log 2>&1
      echo "$load $v $round: $(python3 -c "import json;d=json.load(open('$out/$load-$v-$round.json'));print({k: v for k, v in d.items() if isinstance(v, (int, float))})")"
    done
  done
  [ -n "$pid" ] && kill $pid
done
