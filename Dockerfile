# Understudy proxy image: multi-stage (wheels built in the first stage), runs as a non-root user,
# keeps its SQLite database in the /data volume.
#   docker build -t understudy .
#   docker run -p 8787:8787 -v understudy-data:/data -e UNDERSTUDY_ADMIN_TOKEN=... understudy
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY proxy ./proxy
COPY exporter ./exporter
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 understudy \
    && mkdir -p /data \
    && chown understudy:understudy /data
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER understudy
WORKDIR /data
ENV UNDERSTUDY_HOST=0.0.0.0 \
    UNDERSTUDY_PORT=8787 \
    UNDERSTUDY_DB=/data/understudy.db \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
EXPOSE 8787
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8787/health')"
ENTRYPOINT ["understudy-proxy"]
