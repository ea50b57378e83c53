# The streaminfer image used by docker-compose.yml (every stage runs from it).
FROM python:3.11-slim
WORKDIR /app
# Exactly the locked versions of every dependency, hashes checked (`make lock` refreshes the
# lock). Its own layer, reused until the lock changes.
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements.lock
# The product itself, nothing resolved (.dockerignore leaves tests/, bench/ and state out; the
# packages that go in are pyproject.toml's [tool.setuptools.packages.find]).
COPY . /src
RUN pip install --no-cache-dir --no-deps /src && rm -rf /src
COPY models models
ENV STREAMINFER_MODELS_DIR=/app/models
USER nobody
ENTRYPOINT ["streaminfer"]
