# kandle-operator. Build from the repository root:
#   docker build -f images/operator.Dockerfile -t kandle-operator .
ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS build
ARG TARGET_CPU=x86-64-v2
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    RUSTFLAGS="-C target-cpu=${TARGET_CPU}" cargo build --profile dist --locked -p kandle-operator \
    && cp target/dist/kandle-operator /kandle-operator

# No shell, no package manager: glibc, CA certificates and the binary, as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /kandle-operator /usr/local/bin/kandle-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/kandle-operator"]
CMD ["run"]
