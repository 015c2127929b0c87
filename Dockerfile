# syntax=docker/dockerfile:1
#
# Single `stowage` binary for all five services (`stowage serve <name>`) and
# the migration command (`stowage migrate`).
#
#   docker build -t stowage:dev .
#
# Only the paths cargo needs are copied, so target/ and .stowage/ never enter
# the image. The cache mounts need BuildKit (the default builder since Docker 23).

FROM rust:1-bookworm AS builder
WORKDIR /src

# Media's JPEG codec builds libjpeg-turbo (with its SIMD code) and libwebp from source.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake nasm \
 && rm -rf /var/lib/apt/lists/*

# Every workspace member must be present for cargo to load the workspace.
COPY Cargo.toml Cargo.lock ./
# Build settings (jemalloc's configuration, see bin/stowage/src/lib.rs).
COPY .cargo ./.cargo
COPY proto ./proto
COPY shared ./shared
COPY services ./services
COPY bin ./bin
COPY integration-tests ./integration-tests

RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p stowage \
 && install -D -m 0755 target/release/stowage /out/stowage

FROM debian:bookworm-slim AS runtime

# ca-certificates: TLS to S3, the JWKS endpoint, etc. ffmpeg and heif-convert (libheif-examples): used by media.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates ffmpeg libheif-examples \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 stowage \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin stowage

COPY --from=builder /out/stowage /usr/local/bin/stowage

# For what still allocates through glibc (the C image codecs, ffmpeg): a fixed mmap threshold,
# as glibc's sliding one keeps freed large buffers in the heap. Rust code allocates through
# jemalloc (bin/stowage/src/lib.rs).
ENV MALLOC_MMAP_THRESHOLD_=131072
# Numeric user so Kubernetes can verify runAsNonRoot.
USER 10001:10001
# 7070: gRPC + HTTP, 9090: Prometheus metrics
EXPOSE 7070 9090
ENTRYPOINT ["/usr/local/bin/stowage"]
