#!/bin/sh
# First start of the stack: take secrets from the environment (.env) or generate them, keep
# them in the `secrets` volume, and render FusionAuth's kickstart file with them.
set -eu
umask 077
out=/secrets
env_file="$out/env"

rand() { head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n'; }

if [ ! -s "$env_file" ]; then
  {
    for name in POSTGRES_PASSWORD FUSIONAUTH_DB_PASSWORD FUSIONAUTH_API_KEY FUSIONAUTH_ADMIN_PASSWORD \
                HASURA_ADMIN_SECRET FUSIONSYNC_HASURA_SECRET FUSIONSYNC_WEBHOOK_TOKEN; do
      eval "value=\${$name:-}"
      if [ -z "$value" ]; then value=$(rand); fi
      case "$value" in
        *[!A-Za-z0-9._~+-]*) echo "init: $name may only contain letters, digits and ._~+-" >&2; exit 1 ;;
      esac
      echo "$name=$value"
    done
  } > "$env_file.tmp"
  mv "$env_file.tmp" "$env_file"
  echo "init: secrets written to the secrets volume (docker compose run --rm init cat /secrets/env)"
fi
# shellcheck disable=SC1090
. "$env_file"
sed -e "s/__FUSIONAUTH_API_KEY__/$FUSIONAUTH_API_KEY/g" \
    -e "s/__FUSIONAUTH_ADMIN_PASSWORD__/$FUSIONAUTH_ADMIN_PASSWORD/g" \
    -e "s/__FUSIONSYNC_WEBHOOK_TOKEN__/$FUSIONSYNC_WEBHOOK_TOKEN/g" \
    /kickstart/kickstart.json > "$out/kickstart.json"
# The other containers run as other users; the volume itself is private to this stack.
chmod 644 "$env_file" "$out/kickstart.json"
