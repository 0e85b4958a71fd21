#!/usr/bin/env bash
# The GPU recipe: wheels fetched here, then one command on the GPU machine that installs them,
# writes the random FLUX checkpoint, runs the GPU tests and the benchmark.
#
#   bash bench/device_recipe.sh wheels          # here: pip download --no-deps into .whl/
#   bash bench/device_recipe.sh device [STAGES] # there (python3 with torch): STAGES is any of
#                                               # tests, bench, float8, cards, actions,
#                                               # peer, lora, tiling, profile, off
#                                               # (default: tests bench)
#
# On the device, results go to $OUT (test log, bench log, benchmarks.md, bench.json).
# GPU_TESTS picks test files or ids (default tests/gpu). BENCH_ROWS overrides the benchmark's
# rows (space-separated specs, see bench/bench_engine.py); BENCH_BUDGET_S bounds its wall time;
# RANDOM_FLUX_DIR is where the checkpoint goes; FLOAT8_MODES: torch.compile modes for float8.
# cards: the bot through `python -m bot run` on emulated cards (CARDS, SEED_CARDS: GiB free);
# actions: --n 4, a variation and an upscale through `python -m bot run` (ACTION_CARDS,
# ACTION_BATCHES: model.batch_images values); peer: diffusers' best offloading on emulated
# cards (PEER_CARDS); lora: styles of rank 16 and 64 through `python -m bot run` (LORA_CARDS;
# 0 = the whole card); tiling: TILING_CARDS planned as by default and with the VAE decode kept
# untiled (a copy with TILE_VAE_GAIN_GIB raised); profile: bench/profile_card.py on
# PROFILE_CARDS (per-step times, PROFILE_VARIANTS, a kernel trace of one image; PROFILE_OPTIONS:
# model options, e.g. "park_models=false"); off: OFF_CARDS through the bot with park_models and
# layer_cast off (cards-off.json; without layer_cast the matmuls are bf16 too), to compare with
# a cards run on the same machine.
# MODEL_EXTRA: TOML lines added under [model] for the cards and actions stages (e.g.
# "float8_compute = false"; the rows then name that config).
# At most 8 files come back from the device:
# logs are appended to one file per stage, and tables are made here from the JSON.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the GPU machine's image lacks (python 3.12, torch 2.11, transformers 5.17 are there).
WHEELS=(
  diffsynth==2.1.12 modelscope==1.40.2 modelscope-hub==0.5.1
  cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 ftfy==6.3.1 wcwidth==0.9.4
  einops==0.8.2 imageio==2.38.1 pandas==3.1.1 python-dateutil==2.9.0.post0 six==1.17.0
  aiosqlite==0.22.1 pytest==9.2.0 pytest-asyncio==1.5.0 pluggy==1.7.0 iniconfig==2.3.1
  pygments==2.21.0 diffusers==0.42.1
  babel==2.19.0  # the reply catalogues (bot/i18n) compile their .po with it
)

wheels() {
  mkdir -p .whl  # git-ignored (.gitignore: /.whl/)
  local platforms=()
  for n in 28 27 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
  du -sh .whl
}

device() {
  local stages=("${@:-tests bench}")
  stages=(${stages[*]})
  OUT="${OUT:-/tmp/out}"
  local start=$SECONDS
  mkdir -p "$OUT"
  export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
  python3 -c "import torch, transformers, diffsynth; print('torch', torch.__version__, \
'transformers', transformers.__version__)" | tee -a "$OUT/device.txt"
  export RANDOM_FLUX_DIR="${RANDOM_FLUX_DIR:-/tmp/random-flux}"
  # float8 builds its DiT in memory; tests and bench need the checkpoint on disk
  if [[ " ${stages[*]} " =~ " tests "|" bench "|" cards "|" actions "|" lora "|" tiling "|" profile "|" off " ]] \
      && [ ! -f "$RANDOM_FLUX_DIR/black-forest-labs/FLUX.1-dev/ae.safetensors" ]; then
    python3 bench/make_random_flux.py "$RANDOM_FLUX_DIR" 2>&1 | tee -a "$OUT/device.txt"
    echo "checkpoint written in $((SECONDS - start)) s since the recipe started" | tee -a "$OUT/device.txt"
  fi
  for stage in "${stages[@]}"; do
    case "$stage" in
      tests)
        # shellcheck disable=SC2086
        python3 -m pytest -q -p no:cacheprovider ${GPU_TESTS:-tests/gpu} -m gpu 2>&1 \
          | tee "$OUT/gpu-tests.log" \
          || echo "GPU TESTS FAILED" ;;
      bench)
        # shellcheck disable=SC2086
        # the device's calls end at 10 minutes: stop starting rows in time
        BENCH_BUDGET_S="${BENCH_BUDGET_S:-$((560 - (SECONDS - start)))}" \
        python3 bench/bench_engine.py --ckpt "$RANDOM_FLUX_DIR" ${BENCH_ROWS:+--rows $BENCH_ROWS} \
          --md "$OUT/benchmarks.md" --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" ;;
      float8)
        python3 bench/bench_float8.py --size 1024 --steps 6 --modes "${FLOAT8_MODES:-default}" \
          --json "$OUT/float8.json" \
          --profile-out "$OUT/float8-profile.txt" 2>&1 | tee "$OUT/float8.log" ;;
      cards)
        # shellcheck disable=SC2086
        python3 bench/bench_cards.py --ckpt "$RANDOM_FLUX_DIR" --cards ${CARDS:-5.6 7.5 9.5 11.5 15.5 23} \
          --seed-cards ${SEED_CARDS:-} --extra "${MODEL_EXTRA:-}" --json "$OUT/cards.json" 2>&1 \
          | tee "$OUT/cards.log" || echo "CARDS FAILED" ;;
      actions)
        # shellcheck disable=SC2086
        python3 bench/bench_actions.py --ckpt "$RANDOM_FLUX_DIR" --cards ${ACTION_CARDS:-7.5} \
          --batches ${ACTION_BATCHES:-2 1} --extra "${MODEL_EXTRA:-}" --json "$OUT/actions.json" 2>&1 \
          | tee "$OUT/actions.log" || echo "ACTIONS FAILED" ;;
      peer)
        # shellcheck disable=SC2086
        python3 bench/bench_peer_diffusers.py --cards ${PEER_CARDS:-5.6 7.5 11.5} \
          --json "$OUT/peer.json" 2>&1 | tee "$OUT/peer.log" || echo "PEER FAILED" ;;
      lora)
        # shellcheck disable=SC2086
        python3 bench/bench_lora.py --ckpt "$RANDOM_FLUX_DIR" --cards ${LORA_CARDS:-7.5 0} \
          --json "$OUT/lora.json" 2>&1 | tee "$OUT/lora.log" || echo "LORA FAILED" ;;
      tiling)
        # The VAE-tiling trade-off (docs/benchmarks.md, 2026-12-06 later): TILING_CARDS as the
        # default plans them, then again from a copy whose tiling threshold keeps the decode
        # untiled at 1024² (the same machine, so the two differ by that alone)
        # shellcheck disable=SC2086
        python3 bench/bench_cards.py --ckpt "$RANDOM_FLUX_DIR" --cards ${TILING_CARDS:-7.5 11.5} \
          --json "$OUT/tiling-default.json" 2>&1 | tee "$OUT/tiling.log" || echo "TILING FAILED"
        # shellcheck disable=SC2086
        { rm -rf /tmp/untiled && cp -r . /tmp/untiled \
          && sed -i 's/^TILE_VAE_GAIN_GIB = .*/TILE_VAE_GAIN_GIB = 1.0/' \
            /tmp/untiled/engine/flux/device_budget.py \
          && grep -q '^TILE_VAE_GAIN_GIB = 1.0$' /tmp/untiled/engine/flux/device_budget.py \
          && (cd /tmp/untiled && python3 bench/bench_cards.py --ckpt "$RANDOM_FLUX_DIR" \
            --cards ${TILING_CARDS:-7.5 11.5} --json "$OUT/tiling-untiled.json"); } 2>&1 \
          | tee -a "$OUT/tiling.log" || echo "TILING FAILED" ;;
      profile)
        for card in ${PROFILE_CARDS:-7.5}; do
          # shellcheck disable=SC2086
          python3 bench/profile_card.py --ckpt "$RANDOM_FLUX_DIR" --card "$card" --sizes 1024 \
            --steps 8 --variants ${PROFILE_VARIANTS:-nosync nocopy stream+2 resident+1} \
            --options ${PROFILE_OPTIONS:-} \
            --trace "$OUT/trace-$card.json.gz" --json "$OUT/profile-$card.json" 2>&1 \
            | tee -a "$OUT/profile.log" || echo "PROFILE FAILED"
        done ;;
      off)
        # shellcheck disable=SC2086
        python3 bench/bench_cards.py --ckpt "$RANDOM_FLUX_DIR" --cards ${OFF_CARDS:-7.5 5.6} \
          --extra 'park_models = false\nlayer_cast = false' --json "$OUT/cards-off.json" 2>&1 \
          | tee "$OUT/off.log" || echo "OFF FAILED" ;;
      *) echo "unknown stage $stage" >&2; exit 2 ;;
    esac
  done
}

case "${1:-}" in
  wheels) wheels ;;
  device) shift; device "$@" ;;
  *) echo "usage: $0 wheels | device [tests] [bench] [float8]" >&2; exit 2 ;;
esac
