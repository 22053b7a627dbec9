#!/usr/bin/env bash
# duplex simulate's pictures: a sweep's SVG has one point per layout that runs (as many as the CSV's rows), the
# Pareto front and the chosen layout (the fastest that fits, the first row of the printed table); a --gpus list
# draws one point per cluster size that has a fitting layout, labelled with it.
# usage: sim-plots.sh DUPLEX
set -euo pipefail
duplex=$1
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$duplex" simulate --model deepseek-v3 --cluster h800x2048 --schedule dualpipe,interleaved-fb --tp 1,2 --pp 16,32 \
    --vpp 1,2 --ep 32,64 --svg "$dir/sweep.svg" --csv "$dir/sweep.csv" --top 1 > "$dir/out.txt"
rows=$(($(wc -l < "$dir/sweep.csv") - 1))
points=$(grep -c '<circle cx=[^>]*r="3.5"' "$dir/sweep.svg")
[ "$rows" -gt 4 ] || { echo "only $rows layouts ran"; exit 1; }
[ "$points" -eq "$rows" ] || { echo "$points points for $rows layouts"; exit 1; }
grep -q '<polyline' "$dir/sweep.svg" || { echo "no Pareto front"; exit 1; }
# The chosen layout is the table's best: its schedule and tp/pp/ep in the label.
best=$(awk '/best layouts that fit/ {getline; getline; print; exit}' "$dir/out.txt")
read -r kind tp cp pp vpp ep _ <<< "$best"
grep -q "chosen (circled): $kind tp $tp pp $pp.* ep $ep" "$dir/sweep.svg" || {
    echo "the label does not name the best layout ($best)"; grep -o 'chosen[^<]*' "$dir/sweep.svg"; exit 1; }
for k in dualpipe interleaved-fb; do grep -q ">$k</text>" "$dir/sweep.svg" || { echo "no legend for $k"; exit 1; }; done
"$duplex" simulate --model llama3-405b --cluster h100x2048 --gpus 2048,4096,8192 --schedule interleaved --tp 8 \
    --pp 64 --vpp 4 --ep 1 --global-batch 2048 --no-fp8 --svg "$dir/scale.svg" --csv "$dir/scale.csv" > /dev/null
for g in 2048 4096 8192; do grep -q ">$g</text>" "$dir/scale.svg" || { echo "no point for $g GPUs"; exit 1; }; done
[ "$(grep -c 'r="4"' "$dir/scale.svg")" -eq 3 ] || { echo "not one point per cluster size"; exit 1; }
echo "sim-plots: $points layouts plotted, the chosen one labelled; 3 cluster sizes"
