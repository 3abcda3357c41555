# kt-sidecar image: builds the Cython core, runs `kt serve`.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 kt && mkdir -p /var/lib/kt && chown kt /var/lib/kt
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER kt
WORKDIR /var/lib/kt
EXPOSE 8081 9090
# Listen on all interfaces inside the pod; mount the policy at /etc/kt/policy.yaml.
ENTRYPOINT ["kt", "serve", "--grpc", "0.0.0.0:8081", "--http", "0.0.0.0:9090"]
CMD ["--config", "/etc/kt/policy.yaml", "--state-file", "/var/lib/kt/spend.json"]
