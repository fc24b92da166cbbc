# kandle-server for NVIDIA GPUs (candle's CUDA kernels). Build from the repository root:
#   docker build -f images/server-cuda.Dockerfile --build-arg CUDA_COMPUTE_CAP=90 -t kandle-server:cuda .
# CUDA_COMPUTE_CAP: 80 for A100, 89 for L4/L40S, 90 for H100/H200. CUDA 13, as scripts/build-cuda
# links (the oldest 13.0 libraries, so any 13.x runtime serves).
ARG CUDA_VERSION=13.0.0
FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu22.04 AS build
ARG RUST_VERSION=1.95
ARG CUDA_COMPUTE_CAP=90
ARG TARGET_CPU=x86-64-v2
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# A build stage only: the base image's tag pins the distribution these packages come from.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain ${RUST_VERSION}
ENV PATH=/root/.cargo/bin:${PATH} CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} CUDARC_CUDA_VERSION=13000
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/root/.cargo/registry \
    --mount=type=cache,target=/src/target \
    RUSTFLAGS="-C target-cpu=${TARGET_CPU}" cargo build --profile dist --locked -p kandle-server --features cuda \
    && cp target/dist/kandle-server /kandle-server

# The CUDA runtime libraries (cuBLAS, cuRAND) the binary links; the driver comes from the node.
FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu22.04
COPY --from=build /kandle-server /usr/local/bin/kandle-server
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/kandle-server"]
CMD ["serve", "--device", "cuda"]
