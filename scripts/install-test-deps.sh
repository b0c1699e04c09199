#!/usr/bin/env bash
# Install the independent tools the tests check our output with (Debian packages).
set -euo pipefail
need=()
for pair in skopeo:skopeo umoci:umoci oci-image-tool:oci-image-tool docker-registry:docker-registry zstd:zstd setpriv:util-linux openssl:openssl containerd:containerd; do
  bin=${pair%%:*}; pkg=${pair##*:}
  command -v "$bin" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
# docker-registry must not run as a system service during tests; tests start their own
# (containerd too: the tests start a private one with its own root, state and socket).
if command -v systemctl >/dev/null 2>&1; then systemctl stop docker-registry 2>/dev/null || true; fi
