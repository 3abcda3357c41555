# kt-sidecar image. Two stages: the build stage compiles the Cython core and makes wheels of
# kt-sidecar and every dependency, at the versions in constraints.txt; the final stage
# installs those wheels only (no compiler, no index) and runs `kt serve` as a numeric user.
#   docker build -t kt-sidecar .
# Ports (docs/deploy.md): 8081 gRPC (ext_authz, RLS, ext_proc: Envoy's), 8082 HTTP ext_authz
# (the fast path), 9090 /metrics /healthz /readyz (Prometheus, the kubelet), 9091 the admin
# API (usage reports, spend; bearer token). gRPC, the fast path and the admin API listen on
# loopback by default: Envoy in the same pod reaches them there; beyond loopback each needs
# its credential (--grpc-token-file or mTLS, --admin-token-file).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_CONSTRAINT=/src/constraints.txt
# Debian's archive keeps only the current build of a package: pinned versions would stop
# building at its next security update (the compiler is not in the final image)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# PIP_CONSTRAINT pins the isolated build environment (Cython, grpcio-tools) as well
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links /wheels /wheels/kt_sidecar-*.whl \
    && rm -rf /wheels \
    && mkdir -p /var/lib/kt \
    && chown 10001:10001 /var/lib/kt
# Numeric, so Kubernetes' runAsNonRoot can verify it without an /etc/passwd entry
USER 10001:10001
WORKDIR /var/lib/kt
EXPOSE 8081 8082 9090 9091
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=2)"]
# Mount the policy at /etc/kt/policy.yaml; budget state (embedded backend) lives in
# /var/lib/kt (a volume: the root filesystem can be read-only).
ENTRYPOINT ["kt", "serve"]
CMD ["--grpc", "127.0.0.1:8081", "--http-authz", "127.0.0.1:8082", "--http", "0.0.0.0:9090", \
     "--admin", "127.0.0.1:9091", \
     "--config", "/etc/kt/policy.yaml", "--state-file", "/var/lib/kt/spend.json"]
