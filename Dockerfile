# deltaserve on Debian 12 (CPU backend). Build: docker build -t deltaserve .
# Run:   docker run -p 8000:8000 -v $PWD/adapters:/adapters deltaserve --adapter-dir /adapters
FROM debian:12-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends \
      build-essential cmake ninja-build pkg-config libuv1-dev libcjson-dev node-llhttp \
      libopenblas-dev libopenblas-openmp-dev libpcre2-dev libutf8proc-dev python3 python3-pip ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DDS_CUDA=OFF && cmake --build build \
    && scripts/fetch_model.sh

FROM debian:12-slim
RUN apt-get update && apt-get install -y --no-install-recommends \
      libuv1 libcjson1 libopenblas0-openmp libpcre2-8-0 libutf8proc2 libgomp1 \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/build/deltaserve /usr/local/bin/deltaserve
COPY --from=build /src/models /models
EXPOSE 8000
ENTRYPOINT ["deltaserve", "serve", "--host", "0.0.0.0", "--model", "/models/SmolLM2-135M-Instruct.Q4_1.gguf"]
