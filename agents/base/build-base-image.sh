#!/usr/bin/env bash
# Build the agent base image without Docker Hub (DESIGN.md section 14; docs/agents.md).
#
#   build-base-image.sh [--force]
#
# 1. If the base image exists and its recorded inputs hash (SDK sources, this Dockerfile, parent
#    reference) matches the current sources, print its id and stop.
# 2. Without HIVEMIND_BASE_PARENT: make sure the Debian rootfs image exists. It is imported from a
#    debootstrap minbase tarball, cached so debootstrap runs once per machine.
# 3. docker build the base image from a staged context (Dockerfile + SDK), with no network.
#
# Prints the image id on stdout (progress goes to stderr), so `id=$(build-base-image.sh)` works.
#
# Environment:
#   HIVEMIND_BASE_IMAGE     image to build               (default hivemind/agent-base:local)
#   HIVEMIND_BASE_PARENT    parent image to build FROM, e.g. a registry mirror of the rootfs image;
#                           must hold python3 >= 3.11 and PyYAML (default: the debootstrap rootfs)
#   HIVEMIND_CACHE_DIR      cache for the rootfs tarball (default ${XDG_CACHE_HOME:-~/.cache}/hivemind)
#   HIVEMIND_DEBIAN_MIRROR  Debian mirror for debootstrap (default: the one apt uses)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SDK_DIR="$(cd "$HERE/../sdk" && pwd)"
IMAGE="${HIVEMIND_BASE_IMAGE:-hivemind/agent-base:local}"
ROOTFS_IMAGE="hivemind/debian-rootfs:bookworm"
PARENT="${HIVEMIND_BASE_PARENT:-$ROOTFS_IMAGE}"
CACHE_DIR="${HIVEMIND_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/hivemind}"
SUITE=bookworm
# python3 (not python3-minimal): agents need json and http.client; PyYAML for the rules blocks.
ROOTFS_PACKAGES=python3,python3-yaml
INPUTS_LABEL=org.hivemind.base.inputs.sha256
SDK_LABEL=org.hivemind.sdk.sha256
# Provenance only: re-importing the same rootfs gives a new id and should not force a rebuild.
PARENT_ID_LABEL=org.hivemind.base.parent.id

say() { printf 'build-base-image.sh: %s\n' "$*" >&2; }
fail() { say "error: $*"; exit 1; }

FORCE=0
case "${1:-}" in
    --force) FORCE=1 ;;
    "") ;;
    -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) fail "unknown argument: $1 (expected --force or nothing)" ;;
esac

docker info >/dev/null 2>&1 \
    || fail "no Docker engine answers (start one with agent-runner/deploy/dockerd.sh)"

sha256_of_stdin() { sha256sum | cut -d' ' -f1; }

sdk_sha256() {
    (cd "$SDK_DIR" && find hivemind_agent -type f -name '*.py' -print0 | LC_ALL=C sort -z \
        | xargs -0 sha256sum) | sha256_of_stdin
}

inputs_sha256() {
    {
        echo "sdk $(sdk_sha256)"
        echo "dockerfile $(sha256_of_stdin <"$HERE/Dockerfile")"
        echo "parent $PARENT"
    } | sha256_of_stdin
}

image_label() {
    docker image inspect --format "{{ index .Config.Labels \"$2\" }}" "$1" 2>/dev/null || true
}

image_exists() { docker image inspect "$1" >/dev/null 2>&1; }

debian_mirror() {
    if [[ -n "${HIVEMIND_DEBIAN_MIRROR:-}" ]]; then
        echo "$HIVEMIND_DEBIAN_MIRROR"
        return
    fi
    # The mirror apt already uses (deb822 .sources or one-line format), so no new host is contacted.
    local uri
    uri="$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '/^URIs:/ { for (i = 2; i <= NF; i++) print $i }' \
        | grep -E '/debian/?$' | head -n 1 || true)"
    if [[ -z "$uri" ]]; then
        uri="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) { print $i; break } }' \
            | grep -E '/debian/?$' | head -n 1 || true)"
    fi
    echo "${uri:-http://deb.debian.org/debian}"
}

build_rootfs_tarball() {
    local tarball="$1" mirror work
    [[ "$(id -u)" -eq 0 ]] || fail "debootstrap needs root (or set HIVEMIND_BASE_PARENT to a registry image)"
    command -v debootstrap >/dev/null 2>&1 \
        || fail "debootstrap is missing (apt-get install debootstrap), or set HIVEMIND_BASE_PARENT"
    mirror="$(debian_mirror)"
    work="$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")"
    # shellcheck disable=SC2064  # expand now: the trap must remove this very directory
    trap "rm -rf '$work'" EXIT
    say "debootstrap $SUITE (minbase + $ROOTFS_PACKAGES) from $mirror; this takes about a minute"
    debootstrap --variant=minbase --include="$ROOTFS_PACKAGES" "$SUITE" "$work/root" "$mirror" \
        >"$work/debootstrap.log" 2>&1 || {
        tail -n 30 "$work/debootstrap.log" >&2
        fail "debootstrap failed"
    }
    # Package caches, lists and docs are dead weight in a sandbox that has no network.
    rm -rf "$work/root/var/cache/apt/"*.bin "$work/root/var/cache/apt/archives/"*.deb \
        "$work/root/var/lib/apt/lists/"* "$work/root/usr/share/doc/"* "$work/root/usr/share/man/"* \
        "$work/root/usr/share/info/"* "$work/root/var/log/"*
    tar --numeric-owner -C "$work/root" -cf "$tarball.partial" .
    mv "$tarball.partial" "$tarball"
    rm -rf "$work"
    trap - EXIT
}

ensure_rootfs_image() {
    image_exists "$ROOTFS_IMAGE" && return 0
    local arch tarball
    arch="$(dpkg --print-architecture 2>/dev/null || uname -m)"
    tarball="$CACHE_DIR/debian-$SUITE-minbase-$arch-$(echo "$ROOTFS_PACKAGES" | sha256_of_stdin | cut -c1-12).tar"
    mkdir -p "$CACHE_DIR"
    if [[ -s "$tarball" ]]; then
        say "using cached rootfs $tarball"
    else
        build_rootfs_tarball "$tarball"
    fi
    say "importing $tarball as $ROOTFS_IMAGE"
    docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' \
        --message "debootstrap --variant=minbase --include=$ROOTFS_PACKAGES $SUITE" \
        "$tarball" "$ROOTFS_IMAGE" >/dev/null
}

main() {
    local inputs sdk parent_id context previous_id new_id
    inputs="$(inputs_sha256)"
    if ((FORCE == 0)) && image_exists "$IMAGE" && [[ "$(image_label "$IMAGE" "$INPUTS_LABEL")" == "$inputs" ]]; then
        say "$IMAGE is up to date"
        docker image inspect --format '{{.Id}}' "$IMAGE"
        return 0
    fi

    if [[ -z "${HIVEMIND_BASE_PARENT:-}" ]]; then
        ensure_rootfs_image
    elif ! image_exists "$PARENT"; then
        say "pulling $PARENT"
        docker pull "$PARENT" >&2 || fail "cannot pull $PARENT; unset HIVEMIND_BASE_PARENT to build offline"
    fi

    previous_id="$(docker image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
    sdk="$(sdk_sha256)"
    parent_id="$(docker image inspect --format '{{.Id}}' "$PARENT")"
    context="$(mktemp -d)"
    # shellcheck disable=SC2064  # expand now: the trap must remove this very directory
    trap "rm -rf '$context'" EXIT
    cp "$HERE/Dockerfile" "$context/Dockerfile"
    mkdir -p "$context/sdk/hivemind_agent"
    (cd "$SDK_DIR/hivemind_agent" && find . -type f -name '*.py' -exec cp --parents {} "$context/sdk/hivemind_agent/" \;)

    say "building $IMAGE from $PARENT (sdk $sdk)"
    docker build --network none --pull=false \
        --build-arg "PARENT=$PARENT" \
        --label "$INPUTS_LABEL=$inputs" \
        --label "$SDK_LABEL=$sdk" \
        --label "$PARENT_ID_LABEL=$parent_id" \
        --tag "$IMAGE" "$context" >&2 || fail "docker build of $IMAGE failed"
    rm -rf "$context"
    trap - EXIT
    new_id="$(docker image inspect --format '{{.Id}}' "$IMAGE")"
    # The image this build replaced is now untagged; drop it unless a container still uses it.
    if [[ -n "$previous_id" && "$previous_id" != "$new_id" ]]; then
        docker image rm "$previous_id" >/dev/null 2>&1 || say "kept the previous image $previous_id (in use)"
    fi
    echo "$new_id"
}

main
