#!/usr/bin/env bash
# Build the image and (re)start the container: `/bin/bash ./rebuild.sh`.
# Safe to run any number of times. ACCESS_TOKEN comes from the environment or
# from a .env file next to this script (never from this script itself).
set -euo pipefail

# Edit here, or override with CHAT_GPT_PROXY_IMAGE / _CONTAINER / _PORT.
IMAGE_NAME="${CHAT_GPT_PROXY_IMAGE:-chat_gpt_proxy}"
CONTAINER_NAME="${CHAT_GPT_PROXY_CONTAINER:-chat_gpt_proxy}"
HOST_PORT="${CHAT_GPT_PROXY_PORT:-9081}"
# Docker's stop timeout; the server's SHUTDOWN_GRACE (default 25 s) fits inside it.
STOP_TIMEOUT=30

cd "$(dirname "$0")"

run_args=(--detach --name "$CONTAINER_NAME" --restart unless-stopped
          --stop-timeout "$STOP_TIMEOUT" --publish "$HOST_PORT:9081"
          # Two descriptors per open stream: room for tens of thousands.
          --ulimit nofile=65536:65536
          # The usage ledger (USAGE_DATABASE=/data/usage.sqlite3 in the image):
          # a named volume, so that spend and budgets survive a rebuild.
          --volume "${CONTAINER_NAME}-data:/data")
if [ -f .env ]; then
  run_args+=(--env-file .env)
fi
# Named tokens (docs/team.md): CHAT_GPT_PROXY_TOKENS is the
# tokens file on this host. Its directory is mounted, not the file, so that a
# file replaced by an editor is what SIGHUP (docker kill -s HUP) reloads.
tokens_file="${CHAT_GPT_PROXY_TOKENS:-}"
if [ -n "$tokens_file" ]; then
  if [ ! -r "$tokens_file" ]; then
    echo "ERROR: CHAT_GPT_PROXY_TOKENS: cannot read $tokens_file" >&2
    exit 2
  fi
  tokens_dir="$(cd "$(dirname "$tokens_file")" && pwd)"
  run_args+=(--volume "$tokens_dir:/etc/chat_gpt_proxy:ro"
             --env "ACCESS_TOKENS_FILE=/etc/chat_gpt_proxy/$(basename "$tokens_file")")
fi
if [ -n "${ACCESS_TOKEN:-}" ]; then
  # Passed by name, so the value never shows up in `ps` or shell history.
  export ACCESS_TOKEN
  run_args+=(--env ACCESS_TOKEN)
elif [ -z "$tokens_file" ] && ! { [ -f .env ] && grep -qE '^(ACCESS_TOKEN|ACCESS_KEY|ACCESS_TOKENS_FILE)=.+' .env; }; then
  echo "WARNING: no ACCESS_TOKEN given (environment or .env): the default token 123456 is in use." >&2
  echo "WARNING: anyone who can reach port $HOST_PORT can use this proxy. Set ACCESS_TOKEN!" >&2
fi

docker build --tag "$IMAGE_NAME" .

if docker container inspect "$CONTAINER_NAME" >/dev/null 2>&1; then
  echo "Replacing the running container $CONTAINER_NAME"
  docker stop --time "$STOP_TIMEOUT" "$CONTAINER_NAME" >/dev/null
  docker rm "$CONTAINER_NAME" >/dev/null
fi

docker run "${run_args[@]}" "$IMAGE_NAME" >/dev/null
echo "chat_gpt_proxy is running (port $HOST_PORT, health check: /healthz)"
