"""Deployment: Dockerfile, rebuild.sh, nginx with TLS in front, native TLS.

Docker cannot run here, so the Dockerfile is checked by hadolint and by
performing its install and start steps in a clean virtualenv.
"""

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest
import tornado.httpclient

from chat_gpt_proxy.fake_openai.behaviours import Behaviour
from tests.conftest import ACCESS_TOKEN, AUTH, OPENAI_KEY
from tests.procs import ROOT, Nginx, ServerProcess, example_site, free_port

STREAM = {"prompt": "x", "generate_params": {"stream": True}}


def run(cmd, **kwargs):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, **kwargs)


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or os.path.join(os.path.dirname(sys.executable), "hadolint")
    result = run([hadolint, "Dockerfile"])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ["rebuild.sh", "deploy/nginx/make-cert.sh", ".ci/run", ".ci/system-deps"])
def test_shell_scripts_pass_shellcheck(script):
    result = run(["shellcheck", script])
    assert result.returncode == 0, result.stdout


def dockerfile_steps():
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        text = f.read().replace("\\\n", " ")
    copies = [line.split()[1:-1] for line in text.splitlines() if line.startswith("COPY ")]
    [pip] = [line[4:] for line in text.splitlines() if line.startswith("RUN pip install")]
    [entry] = [json.loads(line[len("ENTRYPOINT ") :]) for line in text.splitlines() if line.startswith("ENTRYPOINT")]
    return [src for group in copies for src in group], pip.split("&&")[0].strip(), entry


def test_dockerfile_user_is_new_to_the_debian_base_image():
    """useradd fails (exit 9) for a name the image already has; Debian's base-passwd lists them all."""
    with open(os.path.join(ROOT, "Dockerfile")) as f:
        dockerfile = f.read()
    [name] = re.findall(r"useradd [^\n]*?(\S+)\s*$", dockerfile, flags=re.M)
    with open("/usr/share/base-passwd/passwd.master") as f:
        debian_users = {line.split(":")[0] for line in f if line.strip()}
    assert "proxy" in debian_users  # the name this Dockerfile used to take
    assert name not in debian_users, name


@pytest.mark.gen_test(timeout=300)
async def test_dockerfile_install_and_start_steps_in_clean_venv(tmp_path, fake_openai):
    """COPY what the Dockerfile copies, run its pip step in a fresh venv, start its ENTRYPOINT."""
    sources, pip_step, entrypoint = dockerfile_steps()
    app = tmp_path / "app"
    app.mkdir()
    for src in sources:
        path = os.path.join(ROOT, src.rstrip("/"))
        if os.path.isdir(path):
            shutil.copytree(path, app / src.rstrip("/"), ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, app)
    venv = tmp_path / "venv"
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "venv", str(venv))
    assert await proc.wait() == 0
    env = dict(os.environ, PATH="%s/bin:%s" % (venv, os.environ["PATH"]), VIRTUAL_ENV=str(venv))
    proc = await asyncio.create_subprocess_shell(pip_step + " -q", cwd=str(app), env=env)
    assert await asyncio.wait_for(proc.wait(), 240) == 0
    port = free_port()
    env.update(PORT=str(port), HOST="127.0.0.1", ACCESS_TOKEN=ACCESS_TOKEN, OPENAI_BASE_URL=fake_openai.url)
    server = await asyncio.create_subprocess_exec(*entrypoint, cwd=str(app), env=env)
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
    try:
        for _ in range(100):
            try:
                response = await client.fetch("http://127.0.0.1:%d/healthz" % port)
                break
            except OSError:
                await asyncio.sleep(0.1)
        assert response.code == 200
        response = await client.fetch(
            "http://127.0.0.1:%d/chat_complete" % port,
            method="POST",
            headers=AUTH,
            body=json.dumps({"prompt": "from the image"}),
        )
        assert json.loads(response.body)["text"] == "Echo: from the image"
    finally:
        client.close()
        server.terminate()
        assert await asyncio.wait_for(server.wait(), 30) == 0


FAKE_DOCKER = """#!/usr/bin/env bash
echo "$*" >> "$DOCKER_LOG"
if [ "$1" = run ]; then env | grep '^ACCESS_TOKEN=' >> "$DOCKER_LOG" || true; fi
if [ "$1 $2" = "container inspect" ]; then [ -f "$DOCKER_STATE" ]; exit $?; fi
if [ "$1" = run ]; then touch "$DOCKER_STATE"; fi
exit 0
"""


@pytest.fixture
def fake_docker(tmp_path):
    """A stand-in `docker` on PATH that records its calls (Docker cannot run here)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "docker").write_text(FAKE_DOCKER)
    (bindir / "docker").chmod(0o755)
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(os.path.join(ROOT, "rebuild.sh"), project)
    env = {k: v for k, v in os.environ.items() if k not in ("ACCESS_TOKEN", "ACCESS_KEY")}
    env.update(
        PATH="%s:%s" % (bindir, env["PATH"]), DOCKER_LOG=str(tmp_path / "calls"), DOCKER_STATE=str(tmp_path / "running")
    )

    def rebuild(**extra):
        result = subprocess.run(
            ["/bin/bash", "./rebuild.sh"], cwd=project, env={**env, **extra}, capture_output=True, text=True, timeout=30
        )
        log = tmp_path / "calls"
        calls = log.read_text().splitlines() if log.exists() else []
        log.unlink(missing_ok=True)
        return result, calls

    rebuild.project = project
    return rebuild


def test_rebuild_is_idempotent_and_replaces_the_container(fake_docker):
    result, calls = fake_docker(ACCESS_TOKEN="tok-from-env")
    assert result.returncode == 0, result.stderr
    assert calls[0] == "build --tag chat_gpt_proxy ."
    assert not any(c.startswith(("stop", "rm")) for c in calls)
    run_call = [c for c in calls if c.startswith("run ")][0]
    for part in (
        "--restart unless-stopped",
        "--publish 9081:9081",
        "--stop-timeout 30",
        "--env ACCESS_TOKEN",
        "--ulimit nofile=65536:65536",
        # The ledger's volume: spend survives a rebuild.
        "--volume chat_gpt_proxy-data:/data",
    ):
        assert part in run_call
    assert "tok-from-env" not in run_call and "ACCESS_TOKEN=tok-from-env" in calls
    assert "WARNING" not in result.stderr

    result, calls = fake_docker(ACCESS_TOKEN="tok-from-env")
    assert result.returncode == 0, result.stderr
    assert "stop --time 30 chat_gpt_proxy" in calls and "rm chat_gpt_proxy" in calls
    assert calls.index("rm chat_gpt_proxy") < calls.index(run_call)


def test_rebuild_reads_env_file_and_warns_without_token(fake_docker):
    result, calls = fake_docker()
    assert "default token 123456 is in use" in result.stderr
    (fake_docker.project / ".env").write_text("ACCESS_TOKEN=tok-from-file\n")
    result, calls = fake_docker()
    assert result.returncode == 0 and "WARNING" not in result.stderr
    assert any("--env-file .env" in c for c in calls)


def test_rebuild_mounts_the_tokens_files_directory(fake_docker, tmp_path):
    tokens = tmp_path / "conf" / "tokens.toml"
    tokens.parent.mkdir()
    tokens.write_text("")
    result, calls = fake_docker(CHAT_GPT_PROXY_TOKENS=str(tokens))
    assert result.returncode == 0 and "WARNING" not in result.stderr, result.stderr
    run_call = [c for c in calls if c.startswith("run ")][0]
    assert "--volume %s:/etc/chat_gpt_proxy:ro" % tokens.parent in run_call
    assert "--env ACCESS_TOKENS_FILE=/etc/chat_gpt_proxy/tokens.toml" in run_call
    result, calls = fake_docker(CHAT_GPT_PROXY_TOKENS=str(tmp_path / "missing.toml"))
    assert result.returncode == 2 and "CHAT_GPT_PROXY_TOKENS" in result.stderr
    assert not any(c.startswith("run ") for c in calls)


@pytest.fixture
def nginx_tls(tmp_path, certificate, http_port):
    """Debian's nginx with the project's site config, on a loopback port, in front of the test proxy."""
    port = free_port()
    nginx = Nginx(example_site(port, [http_port], certificate), tmp_path / "nginx", port)
    yield "https://127.0.0.1:%d" % port
    nginx.stop()


async def fetch_tls(url, certificate, body, chunks=None):
    client = tornado.httpclient.AsyncHTTPClient(force_instance=True)
    try:
        return await client.fetch(
            url + "/chat_complete",
            method="POST",
            headers=AUTH,
            body=json.dumps(body),
            ca_certs=certificate[0],
            request_timeout=30,
            raise_error=False,
            streaming_callback=(lambda c: chunks.append((time.monotonic(), c))) if chunks is not None else None,
        )
    finally:
        client.close()


async def assert_live_stream(url, certificate, fake_openai, gap=0.4):
    """Chunks the upstream sends ``gap`` seconds apart arrive over HTTPS that far apart, not all at once."""
    words = ["one ", "two ", "three "]
    fake_openai.push(Behaviour(chunks=words, delay=gap))
    chunks = []
    response = await fetch_tls(url, certificate, STREAM, chunks)
    assert response.code == 200
    assert_gaps(chunks, words, gap)
    assert b"".join(c for _, c in chunks).endswith(b"data: [DONE]\n\n")


def assert_gaps(chunks, words, gap):
    arrivals = {}
    for at, data in chunks:
        for word in words:
            if ('"content":"%s"' % word).encode() in data:
                arrivals.setdefault(word, at)
    assert list(arrivals) == words, chunks
    times = [arrivals[w] for w in words]
    assert all(b - a > gap / 2 for a, b in zip(times, times[1:], strict=False)), times


@pytest.mark.gen_test(timeout=30)
async def test_through_nginx_with_tls(proxy, fake_openai, nginx_tls, certificate):
    response = await fetch_tls(nginx_tls, certificate, {"prompt": "через nginx"})
    assert response.code == 200 and json.loads(response.body)["text"] == "Echo: через nginx"
    forwarded = fake_openai.received[0]
    assert forwarded.headers["Authorization"] == "Bearer " + OPENAI_KEY

    await assert_live_stream(nginx_tls, certificate, fake_openai)


@pytest.mark.gen_test(timeout=30)
async def test_native_tls(fake_openai, certificate, tmp_path):
    server = ServerProcess(
        {
            "ACCESS_TOKEN": ACCESS_TOKEN,
            "OPENAI_BASE_URL": fake_openai.url,
            "TLS_CERTFILE": certificate[0],
            "TLS_KEYFILE": certificate[1],
        },
        str(tmp_path / "log"),
    )
    try:
        url = "https://127.0.0.1:%d" % server.port
        for _ in range(100):
            try:
                response = await fetch_tls(url, certificate, {"prompt": "tls"})
                if response.code == 200:
                    break
            except OSError:
                pass
            await asyncio.sleep(0.1)
        assert json.loads(response.body)["text"] == "Echo: tls"
        await assert_live_stream(url, certificate, fake_openai)
        assert re.search(r"listening on https://", server.output())
    finally:
        server.stop()
