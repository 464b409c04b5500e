#!/bin/sh
# Entrypoint of the sidecache image (deploy/Dockerfile).
#
# The image runs as uid 10001 (USER in the Dockerfile), and sidecache keeps its cache in
# SIDECACHE_CACHE_DIR (/cache/sidecache), a directory it creates itself (0700) inside the
# /cache mount. That works with no help when /cache is a named volume (Docker copies the
# image's /cache, owned by 10001), a tmpfs (`--tmpfs /cache`, mode 1777) or a Kubernetes
# emptyDir (0777). A host directory bind-mounted there is root's and not writable by 10001:
# either `chown 10001:10001` it on the host, or start the container as root
# (`docker run --user 0`, compose `user: "0"`): then this script creates the cache directory,
# gives it to 10001 (that directory only, not what is inside it, not through a link) and
# drops to 10001 with no capabilities and no_new_privs before sidecache starts. sidecache
# itself never runs as root from this image.
set -eu

uid=10001
gid=10001

if [ "$(id -u)" = 0 ]; then
    cache=${SIDECACHE_CACHE_DIR:-/cache/sidecache}
    if [ -L "$cache" ]; then
        echo "sidecache entrypoint: $cache is a symbolic link; give the real directory" >&2
        exit 64
    fi
    mkdir -p -- "$cache"
    chown -- "$uid:$gid" "$cache"
    chmod 0700 -- "$cache"
    exec setpriv --reuid="$uid" --regid="$gid" --clear-groups --inh-caps=-all \
        --bounding-set=-all --no-new-privs -- sidecache "$@"
fi
exec sidecache "$@"
