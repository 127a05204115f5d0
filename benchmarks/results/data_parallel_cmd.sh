#!/bin/bash
cd /work/benchruns/dp
export DIFFQUANT_ASSETS=/work/shared/assets
ARGS="quantize --model default --recipe qdiffusion:iters_w=50,iters_a=20 --wbits 4 --abits 8 --calib-n 16 --calib-every 2"
# capture once (cached), so both timed runs measure the recipe
python3 run.py $ARGS --out warm > warm.log 2>&1
s=$(date +%s.%N); OMP_NUM_THREADS=2 python3 run.py $ARGS --out one > one.log 2>&1; e=$(date +%s.%N)
echo "one $(echo "$e - $s" | bc) load $(cat /proc/loadavg)" >> times.txt
s=$(date +%s.%N); OMP_NUM_THREADS=1 python3 -m torch.distributed.run --nproc_per_node 2 --master_port 29700 run.py $ARGS --out two > two.log 2>&1; e=$(date +%s.%N)
echo "two $(echo "$e - $s" | bc) load $(cat /proc/loadavg)" >> times.txt
echo done >> times.txt
