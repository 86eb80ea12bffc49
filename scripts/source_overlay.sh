# Sourced by scripts that run duoserve from the working tree without installing it (the GPU
# machine has no pip access to build it). `duoserve_overlay DIR` makes DIR/duoserve a package of
# links to duoserve/* plus the folders of setup.py's SUBPACKAGES (prune/, evaluation/, kernels/, ...)
# as subpackages, the mapping setup.py installs; put DIR first on PYTHONPATH.
duoserve_overlay() {
  local dir=$1 root f sub
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  mkdir -p "$dir/duoserve"
  for f in "$root"/duoserve/*; do ln -s "$f" "$dir/duoserve/"; done
  for sub in $(sed -n 's/^SUBPACKAGES = \[\(.*\)\]$/\1/p' "$root/setup.py" | tr -d '",'); do
    ln -s "$root/$sub" "$dir/duoserve/$sub"
  done
}
