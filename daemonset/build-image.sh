#!/usr/bin/env bash
# Builds the agent's image on this machine, without a Docker engine and without
# pulling any image: a Debian 12 root filesystem made by mmdebstrap from the
# Debian mirror, the project installed into /opt/venv by pip, packed by umoci
# into an OCI image layout. The same recipe as daemonset/Dockerfile (the
# package list is checked to match by tests/container/test_image_files.py).
#
#   daemonset/build-image.sh [--cache DIR] [--out DIR] [--pin DIR] [--rebuild]
#
#   --cache DIR  where root filesystems and layouts are kept and reused
#                [default: $EQUILIBRIUM_IMAGE_CACHE or /var/cache/equilibrium/image]
#   --out DIR    also copy the OCI layout there (it is always in the cache)
#   --pin DIR    write the digest into DIR/daemonset.yaml and DIR/kustomization.yaml
#                (the manifests refer to the image by digest, never by a tag)
#   --rebuild    ignore the cache
#
# Prints progress on stderr; the last line on stdout is the manifest digest
# (sha256:...). The layout is at $cache/current/oci, reference tag $TAG: load it
# with `skopeo copy oci:$cache/current/oci:$TAG docker://REGISTRY/equilibriumd@...`
# or `ctr -n k8s.io images import` of a tar of it.
#
# Caching: the Debian part is keyed on the suite, mirror and package list; the
# image on that plus a hash of the project's sources (setup.cfg, pyproject.toml,
# README.md, equilibriumd/, bpf/) and of this script. Needs root (a chroot).
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
self=$top/daemonset/build-image.sh
say() { printf '[build-image] %s\n' "$*" >&2; }
die() { printf 'build-image.sh: %s\n' "$*" >&2; exit 2; }

SUITE=bookworm
TAG=0.1.0
MIRROR=${EQUILIBRIUM_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY=${EQUILIBRIUM_DEBIAN_SECURITY:-http://deb.debian.org/debian-security}
# What daemonset/Dockerfile installs (keep the two lists equal).
PACKAGES=(python3 python3-venv python3-bpfcc libbpf1 ca-certificates clang libbpf-dev bpftool)
ENV=(PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
     PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 EQUILIBRIUM_BPF_DIR=/opt/equilibrium/bpf)
CMD=(equilibriumd run --kubernetes --config=/etc/equilibrium/equilibrium.yaml)
# Fixed timestamps in the image config and layer: the digest then changes only
# with the contents (which still follow the mirror and PyPI, so it is not
# bit-reproducible over time; see daemonset/README.md, "The image").
EPOCH=${SOURCE_DATE_EPOCH:-1700000000}

cache=${EQUILIBRIUM_IMAGE_CACHE:-/var/cache/equilibrium/image}
out="" pin="" rebuild=0
while [ $# -gt 0 ]; do
    case "$1" in
        --cache) [ $# -ge 2 ] || die "--cache needs a directory"; cache=$2; shift 2 ;;
        --out) [ $# -ge 2 ] || die "--out needs a directory"; out=$2; shift 2 ;;
        --pin) [ $# -ge 2 ] || die "--pin needs the directory of daemonset.yaml"; pin=$2; shift 2 ;;
        --rebuild) rebuild=1; shift ;;
        -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
if [ -n "$pin" ]; then
    for f in daemonset.yaml kustomization.yaml; do
        [ -f "$pin/$f" ] || die "--pin $pin: no $f there"
    done
fi
[ "$(id -u)" -eq 0 ] || die "must run as root (mmdebstrap and chroot)"

# --- tools: Debian packages, installed on demand ---------------------------
need=()
command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
command -v umoci >/dev/null || need+=(umoci)
if [ ${#need[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || die "missing ${need[*]} and no apt-get to install them"
    say "installing ${need[*]} (Debian packages)"
    apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
        || die "could not install ${need[*]}"
fi

start=$(date +%s)
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)
# One build at a time per cache (a second one waits, then reuses the result).
exec 9>"$cache/.lock"
flock 9
sha() { sha256sum | cut -c1-16; }

# --- 1. the Debian root filesystem (cached) --------------------------------
base_key=$(printf '%s\n' "v1" "$SUITE" "$MIRROR" "$SECURITY" "${PACKAGES[@]}" | sha)
base=$cache/base-$base_key
if [ "$rebuild" = 1 ] || [ ! -f "$base/done" ]; then
    rm -rf "$base"
    mkdir -p "$base"
    say "debian: mmdebstrap $SUITE with ${PACKAGES[*]} (about a minute)"
    t0=$(date +%s)
    # --variant=apt is debian:12-slim's minbase; no recommends, no docs, like the slim image.
    mmdebstrap --mode=root --variant=apt --quiet \
        --aptopt='APT::Install-Recommends "false"' \
        --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
        --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*' \
        --include="$(IFS=,; echo "${PACKAGES[*]}")" \
        --customize-hook='chroot "$1" python3 -m venv --system-site-packages /opt/venv' \
        --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/var/log/*.log' \
        "$SUITE" "$base/rootfs" \
        "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" "deb $SECURITY $SUITE-security main" \
        >&2 || die "mmdebstrap failed (is $MIRROR reachable?)"
    touch "$base/done"
    say "debian: done in $(( $(date +%s) - t0 ))s ($(du -sh "$base/rootfs" | cut -f1))"
else
    say "debian: reusing $base"
fi

# --- 2. the project, into /opt/venv (cached by source hash) ----------------
cd "$top"
src_key=$(
    { sha256sum "$self" setup.cfg pyproject.toml README.md
      find equilibriumd bpf -type f ! -path '*/__pycache__/*' ! -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum
    } | sha)
key=$base_key-$src_key
img=$cache/image-$key
if [ "$rebuild" = 1 ] || [ ! -f "$img/digest" ]; then
    rm -rf "$img"
    mkdir -p "$img"
    root=$img/rootfs
    say "image: copying the Debian root filesystem"
    cp -a "$base/rootfs" "$root"
    mkdir -p "$root/opt/equilibrium"
    cp -a setup.cfg pyproject.toml README.md equilibriumd bpf "$root/opt/equilibrium/"
    find "$root/opt/equilibrium" -name __pycache__ -prune -exec rm -rf {} +
    mkdir -p "$cache/pip"
    say "image: pip install (runtime only; equilibriumd/lab is left out by setup.cfg)"
    t0=$(date +%s)
    # A private mount namespace: /dev, /proc, DNS and the pip cache are bound in
    # for the chroot only and vanish with it, also when pip fails.
    touch "$root/etc/resolv.conf"
    unshare --mount --propagation private --pid --fork sh -euc '
        r=$1; cache=$2
        mount --rbind /dev "$r/dev"
        mount -t proc proc "$r/proc"
        mount --bind /etc/resolv.conf "$r/etc/resolv.conf"
        mkdir -p "$r/root/.cache/pip"
        mount --bind "$cache" "$r/root/.cache/pip"
        # The build machine'"'"'s CA bundle, for pip only (an egress proxy that
        # re-signs TLS); the image keeps Debian'"'"'s own bundle.
        mount --bind /etc/ssl/certs/ca-certificates.crt "$r/etc/ssl/certs/ca-certificates.crt"
        env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
            chroot "$r" /opt/venv/bin/pip install --quiet --disable-pip-version-check /opt/equilibrium
        rm -rf "$r/opt/equilibrium/equilibriumd"
        # What the Dockerfile checks: the runtime imports, the lab is not there.
        chroot "$r" sh -c "cd / && /opt/venv/bin/python -c \"import equilibriumd.cli.daemon, equilibriumd.discovery, kubernetes, bcc\" \
            && /opt/venv/bin/python -c \"import importlib.util as u, sys; sys.exit(u.find_spec(\\\"equilibriumd.lab\\\") is not None)\""
    ' sh "$root" "$cache/pip" >&2 || die "installing the project into the image failed (see above)"
    rm -rf "$root/root/.cache" "$root/tmp/"*
    : >"$root/etc/resolv.conf"   # the runtime provides it
    say "image: pip done in $(( $(date +%s) - t0 ))s"

    say "image: packing the OCI layout (umoci)"
    t0=$(date +%s)
    layout=$img/oci
    umoci init --layout "$layout"
    umoci new --image "$layout:$TAG"
    # One layer, entries sorted and timestamps clamped: the same files give the same digest.
    tar --create --file="$img/layer.tar" --directory="$root" --sort=name --numeric-owner \
        --xattrs --mtime="@$EPOCH" --clamp-mtime \
        --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime .
    created=$(date -u -d "@$EPOCH" +%Y-%m-%dT%H:%M:%SZ)
    umoci raw add-layer --image "$layout:$TAG" --history.created "$created" \
        --history.created_by "daemonset/build-image.sh" "$img/layer.tar"
    envargs=()
    for e in "${ENV[@]}"; do envargs+=(--config.env "$e"); done
    cmdargs=()
    for c in "${CMD[@]}"; do cmdargs+=(--config.cmd "$c"); done
    umoci config --image "$layout:$TAG" --no-history --created "$created" \
        --clear=config.env --clear=config.cmd --clear=config.entrypoint \
        "${envargs[@]}" "${cmdargs[@]}" --config.workingdir / \
        --config.label "org.opencontainers.image.title=equilibriumd" \
        --config.label "org.opencontainers.image.version=$TAG"
    umoci gc --layout "$layout"
    rm -rf "$root" "$img/layer.tar"
    python3 - "$layout" "$TAG" >"$img/digest" <<'EOF'
import json, sys
idx = json.load(open(sys.argv[1] + "/index.json"))
ds = [m["digest"] for m in idx["manifests"]
      if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == sys.argv[2]]
assert len(ds) == 1, ds
print(ds[0])
EOF
    say "image: packed in $(( $(date +%s) - t0 ))s ($(du -sh "$layout" | cut -f1))"
else
    say "image: reusing $img"
fi
digest=$(cat "$img/digest")
ln -sfn "$(basename "$img")" "$cache/current"

# Keep the current image and base only: each is hundreds of MB.
for d in "$cache"/image-* "$cache"/base-*; do
    [ -e "$d" ] || continue
    case "$d" in "$img"|"$base") ;; *) say "removing the old $(basename "$d")"; rm -rf "$d" ;; esac
done

if [ -n "$out" ]; then
    rm -rf "$out"
    mkdir -p "$(dirname "$out")"
    cp -a "$img/oci" "$out"
    say "layout copied to $out"
fi
if [ -n "$pin" ]; then
    sed -i -E "s#^( *image: equilibrium/equilibriumd)[:@][^ ]*#\\1@$digest#" "$pin/daemonset.yaml"
    sed -i -E "s#^( *)(newTag|digest): .*#\\1digest: $digest#" "$pin/kustomization.yaml"
    grep -q "equilibriumd@$digest" "$pin/daemonset.yaml" || die "--pin: no 'image: equilibrium/equilibriumd' line in $pin/daemonset.yaml"
    grep -q "digest: $digest" "$pin/kustomization.yaml" || die "--pin: no images: newTag/digest line in $pin/kustomization.yaml"
    say "pinned $digest in $pin/daemonset.yaml and $pin/kustomization.yaml"
fi
say "layout: $img/oci (tag $TAG), built or reused in $(( $(date +%s) - start ))s"
echo "$digest"
