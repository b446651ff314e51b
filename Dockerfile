# enrollment: the gRPC server on a slim Python, as a non-root user.
# Build: docker build -t enrollment .   Run with PostgreSQL: docker compose up
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY protos ./protos
COPY server ./server
COPY client ./client
COPY migrations ./migrations
# The tracing extras: off unless OTEL_TRACES_EXPORTER is set (README "Tracing").
RUN pip install './client[tracing]' '.[tracing]' \
    && useradd --system --uid 10001 --home-dir /data --create-home enrollment

USER enrollment
WORKDIR /data
ENV ENROLLMENT_ADDRESS=0.0.0.0:50051 \
    ENROLLMENT_DATABASE_URL=sqlite:////data/enrollment.db
EXPOSE 50051

# grpc.health.v1 through the server's own command: exit 0 only when SERVING, which
# also turns false while the database is unreachable.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["enrollment-server", "health", "--timeout", "3"]

ENTRYPOINT ["enrollment-server"]
CMD ["serve", "--workers", "2"]
