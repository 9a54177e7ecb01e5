#!/usr/bin/env bash
# Writes a throw-away CA and a server certificate signed by it, for TLS benchmark runs
# (run.sh with TLS=1) and the bench's TLS tests:
#   DIR/ca.pem            the CA certificate (what clients trust: --tls-ca / ,ca=)
#   DIR/server.pem        leaf for localhost, 127.0.0.1 and ::1, then the CA (the chain)
#   DIR/server.key        the leaf's P-256 key, PKCS#8 PEM (rowcast, floor-server and Node take it)
# A separate CA is used because rustls (webpki) refuses a CA certificate as the server's own.
#
# Usage: bench/gen-cert.sh DIR [DAYS]   (DAYS default 7)
set -euo pipefail
dir="${1:?usage: gen-cert.sh DIR [DAYS]}"
days="${2:-7}"
mkdir -p "$dir"
cd "$dir"
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key 2>/dev/null
openssl req -x509 -new -key ca.key -sha256 -days "$days" -subj "/CN=rowcast-bench CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -out ca.pem 2>/dev/null
openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out server.key 2>/dev/null
openssl req -new -key server.key -subj "/CN=localhost" -out server.csr 2>/dev/null
cat >server.ext <<'EXT'
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1
EXT
openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -sha256 \
  -days "$days" -extfile server.ext -out leaf.pem 2>/dev/null
cat leaf.pem ca.pem >server.pem
rm -f server.csr server.ext leaf.pem ca.srl
chmod 600 ca.key server.key
