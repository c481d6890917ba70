# syntax=docker/dockerfile:1
#
# wsgate container image.
#
#   docker build -t wsgate .
#   docker run --rm --stop-timeout 45 -p 8080:8080 -p 8443:8443 \
#       -e WSGATE_ADMIN_TOKEN="$(openssl rand -hex 32)" wsgate
#
# The image runs /etc/wsgate/wsgate.yaml (conf/k8s/wsgate.yaml: listeners and admin on
# 0.0.0.0, a built-in echo upstream, a self-signed certificate for the TLS listener).
# Admin is on 0.0.0.0, so its state-changing endpoints (drain, /connections/close,
# /revoke) need `Authorization: Bearer $WSGATE_ADMIN_TOKEN`; the config does not load
# without the variable (in Kubernetes it comes from a Secret: conf/k8s/README.md).
# Mount your own config over it and your certificates at /etc/wsgate/certs; relative
# paths in the config resolve against /etc/wsgate. See docs/operations.md.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# --- build ------------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS build
WORKDIR /src
# Only what `cargo build --release` reads: the manifest, the lock file and the sources
# (tests, benches, fuzz targets and examples are not part of the binary).
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# Cache mounts keep the crate registry and the target directory between builds; the
# binary is copied out of the cached target directory in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
    && install -D -m 0755 target/release/wsgate /out/usr/local/bin/wsgate
COPY conf/k8s/wsgate.yaml /out/etc/wsgate/wsgate.yaml
COPY conf/example-full.yaml /out/etc/wsgate/example-full.yaml
# Fail the build if the shipped config does not load, checked from the directory the
# image runs in (relative paths resolve against it).
WORKDIR /out/etc/wsgate
RUN WSGATE_ADMIN_TOKEN=build-time-check-only /out/usr/local/bin/wsgate --check --config wsgate.yaml \
    && /out/usr/local/bin/wsgate --version

# --- runtime ----------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE}
# No extra packages: the binary needs only glibc (TLS is rustls, the public CA roots for
# upstream TLS are compiled in), and the HEALTHCHECK below uses bash, head and grep,
# which the base image already has.
RUN groupadd --system --gid 10001 wsgate \
    && useradd --system --uid 10001 --gid wsgate --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin wsgate \
    && install -d -m 0755 -o root -g root /etc/wsgate /etc/wsgate/certs
COPY --from=build /out/ /
USER 10001:10001
WORKDIR /etc/wsgate

# 8080 ws://, 8443 wss://, 9090 admin (/healthz /readyz /metrics open, changes behind the
# token: still, do not publish it beyond the host or cluster).
EXPOSE 8080 8443 9090

# SIGTERM starts the graceful drain; give `docker stop` time for it: `docker stop -t 45`
# (more than drain.timeout, 30s by default), or `--stop-timeout 45` on `docker run`.
STOPSIGNAL SIGTERM

# /healthz over the admin listener, with bash's /dev/tcp (no curl in the image). The
# admin port is taken from WSGATE_ADMIN_PORT; change both if your config moves admin.
ENV WSGATE_ADMIN_PORT=9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/${WSGATE_ADMIN_PORT} && printf 'GET /healthz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3 && head -n 1 <&3 | grep -q '^HTTP/1\\.1 200 '"]

ENTRYPOINT ["/usr/local/bin/wsgate"]
CMD ["--config", "/etc/wsgate/wsgate.yaml"]
