#!/bin/bash
cd /work/benchruns/rss
export DIFFQUANT_ASSETS=/work/shared/assets OMP_NUM_THREADS=2
for n in 16 32; do
  python3 run.py quantize --model default --recipe qdiffusion:iters_w=20,iters_a=10 --wbits 4 --abits 8 --calib-n $n --calib-every 1 --out warm$n > warm$n.log 2>&1
  for mem in 256 100000; do
    python3 - $n $mem <<'PY' >> rss.txt 2>&1
import resource, subprocess, sys, time
n, mem = sys.argv[1], sys.argv[2]
s = time.time()
p = subprocess.run([sys.executable, "run.py", "quantize", "--model", "default", "--recipe", "qdiffusion:iters_w=20,iters_a=10",
                    "--wbits", "4", "--abits", "8", "--calib-n", n, "--calib-every", "1", "--max-memory", mem,
                    "--out", f"q{n}-{mem}"], capture_output=True, text=True)
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(f"n={n} max_memory={mem} rc={p.returncode} wall={time.time()-s:.1f}s peak_rss={rss:.0f}MB load={open('/proc/loadavg').read().split()[0]}")
PY
  done
done
echo done >> rss.txt
