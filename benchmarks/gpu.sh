#!/usr/bin/env bash
# Every CUDA check and GPU benchmark in one run, for a machine with one GPU and no network.
#
#   benchmarks/gpu.sh WHEELS OUT
#
# WHEELS: a folder of the wheels the GPU machine lacks (pyro-ppl, pyro-api, optuna and its dependencies, arviz,
# xarray-einstats, h5netcdf, platformdirs, mlxtend), installed with --no-deps beside the repository; OUT: where the
# suite's summary and the result tables go. The whole suite runs on CUDA first (tests/test_device.py and every
# device-parametrised test), then the benchmarks that have a GPU row.
set -u
wheels=${1:?a folder of wheels}
out=${2:?an output folder}
mkdir -p "$out"
site=$(mktemp -d)
pip install --quiet --no-deps --target "$site" "$wheels"/*.whl
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/machine.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >> "$out/machine.txt"
python -m pytest -q -p no:cacheprovider tests 2>&1 | tail -40 > "$out/tests.txt"
python benchmarks/bench_replay.py --device cuda --repeats 30 --output "$out/replay.md"
python benchmarks/bench_cv.py --device cuda --repeats 7 --output "$out/cv.md"
python benchmarks/bench_lbfgs.py --device cuda --repeats 5 --output "$out/lbfgs.md"
python benchmarks/bench_experiments.py --device cuda --output "$out/experiments.md"
