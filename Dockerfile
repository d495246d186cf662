# The image charts/replicator and manifests/ run: replicator in a slim Python, as a
# non-root user with no home directory (the chart sets HOME=/tmp and a read-only root).
#   docker build -t REGISTRY/replicator:0.1.0 . && docker push REGISTRY/replicator:0.1.0
FROM python:3.11-slim
COPY pyproject.toml README.md /src/
COPY replicator /src/replicator
RUN pip install --no-cache-dir /src && rm -rf /src
# 65532: the uid/gid the chart's securityContext runs as.
USER 65532:65532
ENTRYPOINT ["replicator"]
CMD ["--help"]
