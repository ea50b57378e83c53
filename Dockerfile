# The streaminfer image used by docker-compose.yml (every stage runs from it).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY schemas schemas
COPY stages stages
COPY sinks sinks
COPY ingest ingest
COPY streaminfer streaminfer
RUN pip install --no-cache-dir .
COPY models models
ENV STREAMINFER_MODELS_DIR=/app/models
USER nobody
ENTRYPOINT ["streaminfer"]
