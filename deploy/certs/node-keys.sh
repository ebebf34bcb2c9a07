#!/usr/bin/env bash
# Generate node authentication keys for spikefed clients (Flower SuperNode authentication).
#
#   deploy/certs/node-keys.sh DIR N
#
# Writes DIR/node-1 .. DIR/node-N (ECDSA P-384 private keys in OpenSSH format, one per edge
# device: copy each to its device, `spikefed-client --auth-key node-I`) and DIR/node-I.pub (the
# public keys: give DIR, or a directory holding only the .pub files, to
# `spikefed-server --auth-keys DIR`, which registers them all on its SuperLink). A node whose key
# is not registered is refused. Uses ssh-keygen, or where it is missing (or with
# SPIKEFED_CERTS_WITH=python) deploy/certs/keys.py run by $PYTHON (default python3). Existing
# keys are kept.
set -euo pipefail

if [[ $# -ne 2 || ! $2 =~ ^[0-9]+$ ]]; then
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
dir=$1 n=$2
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$dir"
for ((i = 1; i <= n; i++)); do
    key="$dir/node-$i"
    if [[ -e $key ]]; then echo "kept $key"; continue; fi
    if [[ ${SPIKEFED_CERTS_WITH:-} == python ]] || ! command -v ssh-keygen >/dev/null; then
        "${PYTHON:-python3}" "$here/keys.py" node-key "$key"
    else
        ssh-keygen -q -t ecdsa -b 384 -N "" -C "spikefed node-$i" -f "$key"
    fi
    echo "wrote $key (private, for the device) and $key.pub (for the server)"
done
