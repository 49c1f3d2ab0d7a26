#!/usr/bin/env bash
# Build the images the real-node tests run, without a registry, into buildah's local storage:
#   ${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/images/<name>.ref   (the image's name:tag)
#   ${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/images/<name>.id    (its image ID)
# tests/support/node.py streams an image into containerd when containerd lacks that ID:
#   buildah push REF docker-archive:/dev/stdout:REF | ctr -n k8s.io images import -
# (no archive on disk: the trainer's would be 6.5 GB more).
#
#   base      Debian bookworm (debootstrap --variant=minbase) with python3, python3-venv,
#             ca-certificates, libgomp1: the BASE/BUILDER/RUNTIME image of both Dockerfiles here
#   pause     the pod sandbox image: a static Go program that waits for SIGTERM and reaps children
#   operator  operator/Dockerfile, BASE_IMAGE=base
#   trainer   trainer_image/Dockerfile, BUILDER_IMAGE=RUNTIME_IMAGE=base, DS_ACCELERATOR=cpu and no
#             ahead-of-time DeepSpeed ops (the CUDA base and nvcc are not available here); every
#             Python package from locks/trainer.txt, hashes checked, as in the default build
#
# Python packages come from a local wheelhouse per image (scripts/wheelhouse.sh: pip download
# --require-hashes of the lock; pip's HTTP cache makes it local after the first time), mounted at
# /wheelhouse: the builds install with --no-index --require-hashes. buildah builds with --layers,
# so a code change rebuilds only the small last layers. Each image is rebuilt only when the hash
# of its inputs (Dockerfile, lock, sources, base image, build args) changes: a second run takes
# seconds. KUBETUNE_REBUILD=1 forces a rebuild (buildah --no-cache: a cold build). Usage: scripts/build-images.sh [NAME...]
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
CACHE="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
OUT="$CACHE/images"
mkdir -p "$OUT"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
DEBIAN_RELEASE=bookworm
PAUSE_TAG=3.10
START=$(date +%s)
log() { printf '[build-images %s +%ss] %s\n' "$(date +%H:%M:%S)" "$(( $(date +%s) - START ))" "$*"; }

# ----- packages (Debian; CI runs as root) -----
need=()
for pair in buildah:buildah debootstrap:debootstrap; do
  command -v "${pair%%:*}" >/dev/null || need+=("${pair#*:}")
done
if ((${#need[@]})); then
  log "installing ${need[*]} (apt-get)"
  # one apt-get at a time (make test runs this script beside the other one)
  flock /tmp/kubetune-apt.lock bash -c 'apt-get update -qq && apt-get install -y -qq -o DPkg::Lock::Timeout=600 \
    --no-install-recommends "$@" >/dev/null' apt "${need[@]}"
fi

# buildah without CAP_SYS_RESOURCE: no raised rlimits; cgroupfs (PID 1 is not systemd).
export CONTAINERS_CONF="$OUT/containers.conf"
cat >"$CONTAINERS_CONF" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF

image_exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }
image_id() { buildah inspect --type image --format '{{.FromImageID}}' "$1"; }
stamp_ok() { # name inputs-hash
  [[ "${KUBETUNE_REBUILD:-0}" != 1 && -f "$OUT/$1.ref" && -f "$OUT/.$1.stamp" && "$(cat "$OUT/.$1.stamp")" == "$2" ]] \
    && image_exists "$(cat "$OUT/$1.ref")"
}
save() { # name ref stamp
  buildah inspect --type image --format '{{.FromImageID}}' "$2" >"$OUT/$1.id"
  echo "$2" >"$OUT/$1.ref"
  echo "$3" >"$OUT/.$1.stamp"
  log "$1: $2, $(buildah images --format '{{.Size}}' "$2" | head -n1)"
}
for n in pause operator trainer; do rm -f "$OUT/$n.tar" "$OUT/$n.tar.tmp"; done  # archives of earlier versions
hash_paths() { # paths... -> one hash of the files' contents and names
  find "$@" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum \
    | sha256sum | cut -c1-12
}

want() { local n; for n in "${TARGETS[@]}"; do [[ "$n" == "$1" ]] && return 0; done; return 1; }
TARGETS=("$@")
[[ ${#TARGETS[@]} -gt 0 ]] || TARGETS=(base pause operator trainer)

# ----- base: debootstrap -----
BASE_REF="localhost/kubetune/base:$DEBIAN_RELEASE"
base_stamp="debootstrap minbase $DEBIAN_RELEASE python3 python3-venv ca-certificates libgomp1 v1"
if [[ -f "$OUT/base.rootfs.tar" && "$(cat "$OUT/.base.rootfs.stamp" 2>/dev/null)" == "$base_stamp" \
      && "${KUBETUNE_REBUILD:-0}" != 1 ]]; then
  log "base: rootfs up to date"
else
  log "base: debootstrap $DEBIAN_RELEASE from $DEBIAN_MIRROR"
  rootfs="$(mktemp -d "$OUT/rootfs.XXXX")"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,libgomp1 \
    "$DEBIAN_RELEASE" "$rootfs" "$DEBIAN_MIRROR" >"$OUT/debootstrap.log" 2>&1 \
    || { tail -20 "$OUT/debootstrap.log" >&2; exit 1; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* "$rootfs"/tmp/*
  tar -C "$rootfs" --numeric-owner -cf "$OUT/base.rootfs.tar.tmp" .
  rm -rf "$rootfs"
  mv "$OUT/base.rootfs.tar.tmp" "$OUT/base.rootfs.tar"
  echo "$base_stamp" >"$OUT/.base.rootfs.stamp"
  buildah rmi "$BASE_REF" >/dev/null 2>&1 || true
fi
base_id_stamp="$base_stamp $(sha256sum "$OUT/base.rootfs.tar" | cut -c1-12)"
if ! image_exists "$BASE_REF" || [[ "$(cat "$OUT/.base.stamp" 2>/dev/null)" != "$base_id_stamp" ]]; then
  c="$(buildah from scratch)"
  buildah add --quiet "$c" "$OUT/base.rootfs.tar" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --cmd /bin/bash --label "org.opencontainers.image.description=debootstrap $DEBIAN_RELEASE minbase + python3" "$c"
  buildah commit --quiet --rm "$c" "$BASE_REF" >/dev/null
  echo "$base_id_stamp" >"$OUT/.base.stamp"
  log "base: $BASE_REF committed"
fi
BASE_ID="$(image_id "$BASE_REF")"

# ----- pause: a static Go program, FROM scratch -----
if want pause; then
  src="$CACHE/src/pause"
  mkdir -p "$src"
  cat >"$src/main.go.new" <<'EOF'
// Generated by scripts/build-images.sh: the pod sandbox process. Waits for SIGTERM/SIGINT and
// reaps any child it inherits (it is PID 1 of the pod's PID namespace when that is shared).
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range sigs {
		if s == syscall.SIGCHLD {
			for {
				var ws syscall.WaitStatus
				if pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil); pid <= 0 || err != nil {
					break
				}
			}
			continue
		}
		os.Exit(0)
	}
}
EOF
  mv "$src/main.go.new" "$src/main.go"
  [[ -f "$src/go.mod" ]] || printf 'module kubetune.local/pause\n\ngo 1.22\n' >"$src/go.mod"
  stamp="pause $(sha256sum "$src/main.go" | cut -c1-12) $(go env GOVERSION)"
  PAUSE_REF="localhost/kubetune/pause:$PAUSE_TAG"
  if stamp_ok pause "$stamp"; then
    log "pause: up to date"
  else
    (cd "$src" && CGO_ENABLED=0 GOTOOLCHAIN=local go build -trimpath -ldflags "-s -w" -o pause .)
    c="$(buildah from scratch)"
    buildah copy --quiet "$c" "$src/pause" /pause >/dev/null
    buildah config --entrypoint '["/pause"]' --user 65535:65535 "$c"
    buildah commit --quiet --rm "$c" "$PAUSE_REF" >/dev/null
    save pause "$PAUSE_REF" "$stamp"
  fi
fi

# ----- operator and trainer: the project's Dockerfiles -----
build_dockerfile() { # name dockerfile build-args...
  local name=$1 dockerfile=$2; shift 2
  local wheelhouse="$CACHE/wheelhouse/$name-py3.11"
  local inputs
  inputs="$(hash_paths "$dockerfile" "locks/$name.txt" constraints.txt pyproject.toml README.md operator/kubetune \
    trainer_image/kubetune_trainer)"
  local stamp="$name $inputs base=$BASE_ID args=$*"
  local ref="localhost/kubetune/$name:0.1.0-$inputs"
  if stamp_ok "$name" "$stamp"; then
    log "$name: up to date ($ref)"
    return
  fi
  local lock_sum
  lock_sum="$(sha256sum "locks/$name.txt" | cut -c1-64)"
  if [[ "$(cat "$wheelhouse/.lock.sha256" 2>/dev/null)" != "$lock_sum" ]]; then
    log "$name: wheelhouse $wheelhouse (pip download --require-hashes of locks/$name.txt)"
    bash scripts/wheelhouse.sh "$name" "$wheelhouse" 3.11
    echo "$lock_sum" >"$wheelhouse/.lock.sha256"
  fi
  log "$name: buildah bud -f $dockerfile"
  local t0=$SECONDS
  local cache_flag=--layers
  [[ "${KUBETUNE_REBUILD:-0}" == 1 ]] && cache_flag=--no-cache
  buildah bud --quiet "$cache_flag" --network host --format docker -f "$dockerfile" \
    --volume "$wheelhouse:/wheelhouse:ro" "$@" -t "$ref" "$REPO" >"$OUT/$name.build.log" 2>&1 \
    || { tail -40 "$OUT/$name.build.log" >&2; exit 1; }
  log "$name: built in $((SECONDS - t0)) s"
  # earlier builds of this image: untag (their layers stay while a newer build shares them)
  buildah images --format '{{.Name}}:{{.Tag}}' 2>/dev/null | grep "^localhost/kubetune/$name:" | grep -vx "$ref" \
    | xargs -r buildah rmi >/dev/null 2>&1 || true
  save "$name" "$ref" "$stamp"
}

if want operator; then
  build_dockerfile operator operator/Dockerfile --build-arg "BASE_IMAGE=$BASE_REF"
fi
if want trainer; then
  build_dockerfile trainer trainer_image/Dockerfile --build-arg "BUILDER_IMAGE=$BASE_REF" \
    --build-arg "RUNTIME_IMAGE=$BASE_REF" --build-arg DS_ACCELERATOR=cpu \
    --build-arg DS_BUILD_FUSED_ADAM=0 --build-arg DS_BUILD_CPU_ADAM=0
fi
for n in "${TARGETS[@]}"; do  # the image IDs, also of images that were up to date
  [[ -f "$OUT/$n.ref" ]] && buildah inspect --type image --format '{{.FromImageID}}' "$(cat "$OUT/$n.ref")" >"$OUT/$n.id"
done
log "done"
