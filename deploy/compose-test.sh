#!/usr/bin/env bash
# Runs the real docker-compose.yml on a machine that cannot pull images: builds each image it
# names from what is installed here (FROM scratch with the binary and the libraries it links),
# starts the cluster and checks it end to end through the load balancer (compose_check.py).
# Its secrets come from .env, created by deploy/compose/init-secrets.sh when missing, as a user's.
set -euo pipefail
cd "$(dirname "$0")/.."

project=brokertest
compose() {
  if docker compose version >/dev/null 2>&1; then docker compose -p "$project" "$@"
  else docker-compose -p "$project" "$@"; fi
}

for pkg in redis-server haproxy; do
  command -v "$pkg" >/dev/null 2>&1 || {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null
  }
done
python3 -c 'import websockets' 2>/dev/null || pip install -q websockets

cargo build --release --locked --bin session-broker
broker=${CARGO_TARGET_DIR:-target}/release/session-broker
deploy/compose/init-secrets.sh

export BROKER_IMAGE=session-broker:local
export REDIS_IMAGE=session-broker-redis:local
export LB_IMAGE=session-broker-haproxy:local

# image NAME CMD_JSON BINARY... : a scratch image holding the binaries under /usr/local/bin,
# every library they link, and a non-root user 65532.
image() {
  local name=$1 entry=$2; shift 2
  local ctx; ctx=$(mktemp -d)
  mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/etc" "$ctx/rootfs/tmp"
  chmod 1777 "$ctx/rootfs/tmp"
  echo 'root:x:0:0:root:/:/sbin/nologin' > "$ctx/rootfs/etc/passwd"
  echo 'nonroot:x:65532:65532:nonroot:/:/sbin/nologin' >> "$ctx/rootfs/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' > "$ctx/rootfs/etc/group"
  for bin in "$@"; do
    cp "$bin" "$ctx/rootfs/usr/local/bin/"
    for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
      mkdir -p "$ctx/rootfs$(dirname "$lib")"
      cp -L "$lib" "$ctx/rootfs$lib"
    done
  done
  cat > "$ctx/Dockerfile" <<DOCKERFILE
FROM scratch
COPY rootfs/ /
ENV PATH=/usr/local/bin
$entry
DOCKERFILE
  docker build -q -t "$name" "$ctx" >/dev/null
  rm -rf "$ctx"
  echo "built $name"
}

image "$BROKER_IMAGE" 'USER 65532
ENV BROKER__LISTEN=0.0.0.0:8080
HEALTHCHECK --interval=5s --timeout=3s CMD ["session-broker", "healthcheck", "--url", "http://127.0.0.1:9090/healthz"]
ENTRYPOINT ["session-broker"]
CMD ["serve"]' "$broker"
image "$REDIS_IMAGE" 'CMD ["redis-server"]' "$(command -v redis-server)"
image "$LB_IMAGE" 'CMD ["haproxy", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]' "$(command -v haproxy)"

cleanup() { compose down -v --remove-orphans >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup
compose up -d --no-build
python3 deploy/compose_check.py "$project"
echo "compose test passed"
