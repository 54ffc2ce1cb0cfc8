# The broker image: built in a Rust image, run from a small distroless one as a non-root user.
#   docker build -t session-broker .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations-lua migrations-lua
COPY benches benches
RUN cargo build --release --locked --bin session-broker

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/session-broker /usr/local/bin/session-broker
USER nonroot
ENV BROKER__LISTEN=0.0.0.0:8080
# The internal listener (metrics, probes) stays on the container's loopback unless the settings
# say otherwise (internal_listen): this health check runs inside the container and reaches it.
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["/usr/local/bin/session-broker", "healthcheck", "--url", "http://127.0.0.1:9090/healthz"]
ENTRYPOINT ["/usr/local/bin/session-broker"]
CMD ["serve"]
