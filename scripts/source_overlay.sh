# Sourced by scripts that run duoserve from the working tree without installing it (the GPU
# machine has no pip access to build it). `duoserve_overlay DIR` makes DIR/duoserve a package of
# links to duoserve/* plus prune/, kernels/, loaders/ and loadtest/ as subpackages, the mapping
# setup.py installs; put DIR first on PYTHONPATH.
duoserve_overlay() {
  local dir=$1 root f sub
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  mkdir -p "$dir/duoserve"
  for f in "$root"/duoserve/*; do ln -s "$f" "$dir/duoserve/"; done
  for sub in prune kernels loaders loadtest; do ln -s "$root/$sub" "$dir/duoserve/$sub"; done
}
