#!/usr/bin/env bash
# Make a self-signed certificate for nginx (or for TLS_CERTFILE/TLS_KEYFILE).
# Usage: deploy/nginx/make-cert.sh [DIR] [NAME]   (default DIR=/etc/nginx/ssl, NAME=localhost)
# NAME becomes the subject and a subjectAltName (IP or DNS, as it looks).
set -euo pipefail

dir="${1:-/etc/nginx/ssl}"
name="${2:-localhost}"
days="${DAYS:-825}"

if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then
  san="IP:$name"
else
  san="DNS:$name"
fi

mkdir -p "$dir"
umask 077
openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$days" \
  -subj "/CN=$name" -addext "subjectAltName=$san" \
  -keyout "$dir/chat_gpt_proxy.key" -out "$dir/chat_gpt_proxy.crt" 2>/dev/null
chmod 644 "$dir/chat_gpt_proxy.crt"
echo "wrote $dir/chat_gpt_proxy.crt and $dir/chat_gpt_proxy.key (CN=$name, $san, $days days)"
