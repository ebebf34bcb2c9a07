#!/usr/bin/env bash
# Generate a private CA and a server certificate for spikefed-server (TLS at its nginx proxy and
# its loopback SuperLink).
#
#   deploy/certs/generate.sh [--ca-dir CADIR] DIR [HOST ...]
#
# Writes into DIR:  ca.crt server.pem server.key (passed as `spikefed-server --tls-dir DIR`), and
# into CADIR (default: DIR-ca, beside DIR):  ca.key ca.crt, the CA that signs them: keep CADIR
# off the server (offline); whoever holds ca.key can make certificates every device trusts, and
# spikefed-server warns when it finds a CA key in --tls-dir. The server certificate is valid for
# every HOST given (names or IP addresses) and always for localhost, 127.0.0.1 and ::1; clients
# verify it with `spikefed-client --ca-cert DIR/ca.crt`, so list every name or address the clients
# use to reach the server. Keys are ECDSA P-256, private keys mode 600. Uses openssl, or where it
# is missing (or with SPIKEFED_CERTS_WITH=python) deploy/certs/keys.py run by $PYTHON (default
# python3) with the `cryptography` package Flower installs. Refuses to overwrite existing files.
set -euo pipefail

if [[ $# -lt 1 || "$1" == -h || "$1" == --help ]]; then
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    [[ $# -lt 1 ]] && exit 2 || exit 0
fi
cadir=""
if [[ "$1" == --ca-dir ]]; then
    [[ $# -ge 3 ]] || { echo "error: --ca-dir needs a directory, then DIR" >&2; exit 2; }
    cadir=$2; shift 2
fi
dir=$1; shift
cadir=${cadir:-${dir%/}-ca}
hosts=()
for h in "$@" localhost 127.0.0.1 ::1; do
    [[ " ${hosts[*]} " == *" $h "* ]] || hosts+=("$h")
done
if [[ -e "$dir/server.pem" || -e "$dir/ca.crt" ]]; then
    echo "error: $dir already holds certificates; remove them or choose another DIR" >&2
    exit 2
fi
if [[ -e "$cadir/ca.key" ]]; then
    echo "error: $cadir already holds a CA key; remove it or choose another --ca-dir" >&2
    exit 2
fi
if [[ "$(cd "$(dirname "$cadir")" 2>/dev/null && pwd)/$(basename "$cadir")" == \
      "$(mkdir -p "$dir" && cd "$dir" && pwd)" ]]; then
    echo "error: --ca-dir must not be DIR: the CA key stays off the server" >&2
    exit 2
fi
mkdir -p "$dir" "$cadir"
umask 077
here=$(cd "$(dirname "$0")" && pwd)
days=${SPIKEFED_CERT_DAYS:-365}
if [[ ${SPIKEFED_CERTS_WITH:-} == python ]] || ! command -v openssl >/dev/null; then
    "${PYTHON:-python3}" "$here/keys.py" tls "$dir" "${hosts[@]}"
else

# subjectAltName: IP addresses as IP:, everything else as DNS:
san=""
for h in "${hosts[@]}"; do
    if [[ $h =~ ^[0-9.]+$ || $h == *:* ]]; then entry="IP:$h"; else entry="DNS:$h"; fi
    san="${san:+$san,}$entry"
done

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha256 -nodes -days "$days" \
    -keyout "$dir/ca.key" -out "$dir/ca.crt" -subj "/CN=spikefed CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha256 -nodes -keyout "$dir/server.key" \
    -out "$dir/server.csr" -subj "/CN=${hosts[0]}" 2>/dev/null
ext=$(mktemp)
trap 'rm -f "$ext"' EXIT
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
    "$san" > "$ext"
openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -CAcreateserial -out "$dir/server.pem" -days "$days" -sha256 -extfile "$ext" 2>/dev/null
rm -f "$dir/server.csr" "$dir/ca.srl"
fi
# the CA key leaves the server's directory
mv "$dir/ca.key" "$cadir/ca.key"
cp "$dir/ca.crt" "$cadir/ca.crt"
chmod 600 "$cadir/ca.key" "$dir/server.key"
chmod 644 "$dir/ca.crt" "$dir/server.pem" "$cadir/ca.crt"
echo "wrote $dir/ca.crt, $dir/server.pem, $dir/server.key (hosts: ${hosts[*]}); the CA key is" \
     "$cadir/ca.key: keep it off the server"
