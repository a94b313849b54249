# chat_gpt_proxy: one process, port 9081. Build and run with ./rebuild.sh.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, in their own layer: rebuilt only when requirements.txt
# changes. pycurl's wheel carries its own libcurl, so no compiler is needed.
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin chatgptproxy \
    && mkdir /data && chown 10001 /data

COPY server.py settings.py ./
COPY handlers/ handlers/
COPY chat_gpt_proxy/ chat_gpt_proxy/
COPY static/ static/

# Numeric, so the runtime need not resolve the name (user "chatgptproxy" above;
# not "proxy", which every Debian image already has as uid 13).
USER 10001
EXPOSE 9081

# The usage ledger (budgets survive a restart): mount a volume here, as
# rebuild.sh does. For several instances sharing one ledger, set
# USAGE_DATABASE=postgresql://… instead.
ENV USAGE_DATABASE=/data/usage.sqlite3
VOLUME /data

HEALTHCHECK --interval=30s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '9081'), timeout=2); sys.exit(r.status != 200)"]

# Exec form: the server is PID 1 and receives SIGTERM itself (graceful shutdown).
ENTRYPOINT ["python", "server.py"]
