# syntax=docker/dockerfile:1
# dinghook: build with the Rust toolchain, run from a small distroless image as non-root.
#
#   docker build -t dinghook .
#   docker run -p 8080:8080 -v dinghook-data:/data \
#     -e DINGHOOK_TOKEN=... -e DINGHOOK_AES_KEY=... -e DINGHOOK_OWNER_KEY=... dinghook

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Manifests first, so dependency builds are cached across source changes.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY examples ./examples
# The workspace lists crates/fake-dingtalk, so cargo needs it to load the manifest; only the
# dinghook binary is built and shipped (the fake DingTalk is for tests and local use).
COPY crates ./crates
RUN cargo build --release --locked -p dinghook --bin dinghook \
    && mkdir -p /out/data \
    && cp target/release/dinghook /out/dinghook \
    && strip /out/dinghook

# distroless/cc: glibc and libgcc only, no shell, no package manager; "nonroot" is uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/dinghook /usr/local/bin/dinghook
COPY --from=build --chown=65532:65532 /out/data /data
# 8080: the callback (publish it). 9464: /metrics and the probes for operators (publish it only
# to the monitoring network, if at all).
ENV DINGHOOK_LISTEN=0.0.0.0:8080 \
    DINGHOOK_OPS_LISTEN=0.0.0.0:9464 \
    DINGHOOK_STORE_URL=sqlite:///data/dinghook.db \
    DINGHOOK_LOG_FORMAT=json
VOLUME ["/data"]
USER 65532:65532
EXPOSE 8080 9464
# No curl in the image: the binary checks itself.
HEALTHCHECK --interval=10s --timeout=4s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/dinghook", "healthcheck", "http://127.0.0.1:8080/healthz"]
ENTRYPOINT ["/usr/local/bin/dinghook"]
CMD ["serve"]
