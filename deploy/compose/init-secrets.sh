#!/usr/bin/env bash
# Gives the local cluster (docker-compose.yml) its secrets: a token signing key and a Redis
# password, written to .env at the repository root, which Docker Compose reads by itself and git
# ignores. Variables already in .env are kept, so running it again changes nothing and a file
# holding other settings (LB_BIND, image names) is only added to.
#   deploy/compose/init-secrets.sh
set -euo pipefail
cd "$(dirname "$0")/../.."

file=.env
# Readable by its owner only: it holds what lets anyone mint tokens and write to Redis.
umask 077
touch "$file"
# A last line without its newline would run into the first line appended.
if [ -s "$file" ] && [ -n "$(tail -c1 "$file")" ]; then echo >> "$file"; fi
for var in SIGNING_KEY REDIS_PASSWORD; do
  grep -q "^$var=" "$file" && continue
  # Hex: safe in an env file and inside the redis:// URL without escaping. 32 random bytes give
  # a 64-byte key, above the broker's 32-byte minimum.
  echo "$var=$(openssl rand -hex 32)" >> "$file"
  echo "wrote $var to $file"
done
