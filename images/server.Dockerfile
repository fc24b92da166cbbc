# kandle-server for CPUs. Build from the repository root:
#   docker build -f images/server.Dockerfile -t kandle-server .
# TARGET_CPU is the baseline the compiler may assume. The quantized matmul kernels pick AVX2
# at run time whatever it is; x86-64-v3 also lets the compiler use AVX2 everywhere else
# (norms, activations), for machines known to have it.
ARG RUST_VERSION=1.95
FROM rust:${RUST_VERSION}-bookworm AS build
ARG TARGET_CPU=x86-64-v2
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    RUSTFLAGS="-C target-cpu=${TARGET_CPU}" cargo build --profile dist --locked -p kandle-server \
    && cp target/dist/kandle-server /kandle-server

# No shell, no package manager: glibc, CA certificates and the binary, as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /kandle-server /usr/local/bin/kandle-server
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/kandle-server"]
CMD ["serve"]
