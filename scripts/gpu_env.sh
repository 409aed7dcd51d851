# Sourced by the GPU scripts: installs the carried wheels in .whl/ (flashinfer, transformers, ...)
# into /tmp/site, unpacks the flashinfer JIT builds carried in .fi_cache/, and puts the repository
# (and its tests/ and benchmarks/ helpers) on PYTHONPATH.
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site
fi
if compgen -G ".fi_cache/fi_cache.tgz.*" > /dev/null; then
  mkdir -p ~/.cache && cat .fi_cache/fi_cache.tgz.* | tar xzf - -C ~/.cache
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD:$PWD/tests:$PWD/benchmarks"
# when the calling shell exits, bring flashinfer's JIT builds back in $OUT (pieces under 16 MB)
if [ -n "${OUT:-}" ]; then
  trap '[ -d ~/.cache/flashinfer ] && tar czf - -C ~/.cache flashinfer | split -b 15M - "$OUT/fi_cache.tgz."' EXIT
fi
