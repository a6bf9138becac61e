# lb: one container in front of a pool of model servers.
#   docker build -t lb .
#   docker run -p 8080:8080 -p 9901:9901 -v $PWD/config.yaml:/etc/lb/config.yaml lb
# The config must listen on 0.0.0.0 inside the container (listen.host / admin.host); an admin
# listener on a non-loopback address should be firewalled to the scraping network.
FROM python:3.11-slim

ENV LB_LISTEN_HOST=0.0.0.0 \
    LB_ADMIN_HOST=0.0.0.0 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin lb

WORKDIR /src
COPY pyproject.toml README.md ./
COPY lb ./lb
COPY backends ./backends
# The data plane is compiled with mypyc (lb/native.py) by a compiler installed and removed in
# this one layer; should the compile fail, the image still runs, as pure Python.
ENV LB_NATIVE_DIR=/opt/lb-native
RUN pip install '.[native]' \
    && apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && (cd / && python -m lb.native_build build || echo "lb: no compiled build; pure Python") \
    && pip uninstall -y mypy \
    && apt-get purge -y --auto-remove gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* /src

COPY config.yaml /etc/lb/config.yaml

USER lb
EXPOSE 8080 9901
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD python -c "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2).status == 200 else 1)"

ENTRYPOINT ["lb"]
CMD ["--config", "/etc/lb/config.yaml"]
