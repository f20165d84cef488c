export PYTHONPATH=$PWD
mkdir -p $OUT/r
M="smsp__inst_executed.sum,dram__bytes_read.sum,launch__registers_per_thread,launch__shared_mem_per_block_dynamic,launch__occupancy_limit_shared_mem,launch__occupancy_limit_registers,sm__warps_active.avg.pct_of_peak_sustained_active"
for r in long_scoreboard short_scoreboard wait not_selected math_pipe_throttle barrier mio_throttle lg_throttle no_instruction dispatch_stall; do
  M="$M,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio"; done
for v in "bf16 64 4 2" "fp8 128 2 2" "fp8 64 2 2" "fp8 128 2 1" "fp8 64 4 2" "fp8 128 2 2 VT" "int8 64 4 2" "int8 128 2 2"; do
  f="$OUT/r/ncu-${v// /-}.txt"
  timeout 60 python3 ab_exp/ncu_attn.py $v 2>&1 | tail -1
  timeout 90 ncu --clock-control none --profile-from-start off -k regex:_decode_kernel --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats --metrics "$M" python3 ab_exp/ncu_attn.py $v > "$f" 2>&1
  echo "--- $v"; grep -E "Duration|DRAM Throughput|Achieved Occupancy|Theoretical Occupancy|No Eligible|Registers Per|Dynamic Shared|Block Limit|inst_executed.sum|stalled_(long_scoreboard|short_scoreboard|wait|not_selected|barrier|mio_throttle|math)" "$f" | sed 's/  */ /g; s/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//'
done
cd $OUT && tar czf r.tgz r && rm -rf r
