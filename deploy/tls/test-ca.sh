#!/usr/bin/env bash
# Makes a throw-away certificate authority for tests and local TLS set-ups (never production):
#
#   deploy/tls/test-ca.sh DIR [NAME…]
#
# DIR gets ca.crt/ca.key (EC P-256, 10 days), server.crt/server.key for the NAMEs (default
# `localhost` and `127.0.0.1`: DNS and IP subject alternative names), client.crt/client.key
# (CN aihub-client, for mutual TLS) and other-ca.crt (an unrelated CA, for "wrong CA" tests).
# Keys are PKCS#8 PEM (`BEGIN PRIVATE KEY`), mode 0600. An existing ca.crt is kept (run it again
# to add nothing); delete DIR to start over. Needs the openssl command (Debian's `openssl`).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 DIR [NAME…]" >&2; exit 2; }
DIR=$1
shift
NAMES=("$@")
[ ${#NAMES[@]} -gt 0 ] || NAMES=(localhost 127.0.0.1)
command -v openssl >/dev/null || { echo "the openssl command is required (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$DIR"
cd "$DIR"
umask 077
[ -s ca.crt ] && exit 0

SAN=""
for n in "${NAMES[@]}"; do
    if [[ "$n" =~ ^[0-9.]+$ || "$n" == *:* ]]; then SAN+="IP:$n,"; else SAN+="DNS:$n,"; fi
done
SAN=${SAN%,}

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

ca() { # NAME FILE-PREFIX
    newkey "$2.key"
    openssl req -x509 -new -key "$2.key" -days 10 -subj "/CN=$1" -out "$2.crt" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
}

leaf() { # CN FILE-PREFIX EXTENSIONS
    newkey "$2.key"
    openssl req -new -key "$2.key" -subj "/CN=$1" -out "$2.csr"
    printf '%s\n' "$3" > "$2.ext"
    openssl x509 -req -in "$2.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 10 \
        -extfile "$2.ext" -out "$2.crt" 2>/dev/null
    rm -f "$2.csr" "$2.ext"
}

ca "aihub test CA" ca
leaf "${NAMES[0]}" server "subjectAltName=$SAN
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth"
leaf aihub-client client "basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
ca "unrelated test CA" other-ca
rm -f other-ca.key ca.srl
# Certificates are public; servers running as other users (postgres) read the keys they are
# given a copy of.
chmod 644 ./*.crt
