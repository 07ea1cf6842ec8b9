#!/usr/bin/env bash
# Builds the Tapestry runtime image without pulling anything: the `tapestry`
# binary built here, with the shared libraries it links (from this machine),
# in an image FROM scratch. Same entrypoint, user, volume, ports and
# healthcheck as deploy/Dockerfile's runtime stage.
#
#   deploy/build-image.sh [TAG] [--debug]
#
# TAG defaults to tapestry:local. --debug packs target/debug/tapestry as it
# is (the tests use it: `cargo test --workspace` has just built it) instead of
# building a release binary.
set -euo pipefail
cd "$(dirname "$0")/.."
tag=tapestry:local
profile=release
for arg in "$@"; do
  case "$arg" in
    --debug) profile=debug ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    -*) echo "build-image.sh: unknown flag $arg" >&2; exit 2 ;;
    *) tag=$arg ;;
  esac
done
if [ "$profile" = release ]; then
  cargo build --release --locked -p tapestry-node
fi
bin=target/$profile/tapestry
[ -x "$bin" ] || { echo "build-image.sh: no $bin (cargo build -p tapestry-node)" >&2; exit 1; }

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
root=$ctx/rootfs
mkdir -p "$root/usr/local/bin" "$root/etc" "$ctx/data" "$ctx/tmp"
chmod 1777 "$ctx/tmp"
cp "$bin" "$root/usr/local/bin/tapestry"
# The dynamic loader and every library the binary links, at the same paths.
ldd "$bin" | awk '/=> \// {print $3} /^\t\// {print $1}' | while read -r lib; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
printf 'root:x:0:0::/root:/sbin/nologin\ntapestry:x:10001:10001::/data:/sbin/nologin\n' > "$root/etc/passwd"
printf 'root:x:0:\ntapestry:x:10001:\n' > "$root/etc/group"
cat > "$ctx/Dockerfile" <<'DOCKERFILE'
FROM scratch
COPY rootfs/ /
COPY --chown=10001:10001 data/ /data/
COPY --chown=10001:10001 tmp/ /tmp/
USER 10001:10001
VOLUME ["/data"]
ENV TAPESTRY_DATA_DIR=/data \
    TAPESTRY_API=0.0.0.0:8080 \
    TAPESTRY_INIT=1 \
    RAYON_NUM_THREADS=1
EXPOSE 4001/tcp 4001/udp 8080/tcp
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["/usr/local/bin/tapestry", "health", "--api", "127.0.0.1:8080"]
ENTRYPOINT ["/usr/local/bin/tapestry"]
CMD ["run", "--listen", "/ip4/0.0.0.0/tcp/4001", "--listen", "/ip4/0.0.0.0/udp/4001/quic-v1"]
DOCKERFILE
docker build --quiet -t "$tag" "$ctx" >/dev/null
echo "built $tag from $bin ($(du -sh "$root" | cut -f1) of files)"
