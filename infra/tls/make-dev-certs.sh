#!/usr/bin/env sh
# Development TLS material for amqps: a CA, a broker certificate and a client certificate.
#
#   infra/tls/make-dev-certs.sh [OUT_DIR] [EXTRA_SAN ...]
#
# OUT_DIR defaults to infra/tls/dev (ignored by git). The broker certificate names every
# host clients use: `rabbitmq` (compose), `fedmq-rabbitmq` and its cluster-local names
# (Kubernetes), `localhost`; pass more as EXTRA_SAN (e.g. `DNS:broker.example.org`).
# Keys are world-readable so the non-root containers (fedmq uid 10001, rabbitmq uid 999)
# can read the bind mount: fine for a laptop, never for real keys (use Secrets there).
set -eu
out=${1:-$(dirname "$0")/dev}
[ $# -gt 0 ] && shift
days=825
mkdir -p "$out"
cd "$out"

sans="DNS:rabbitmq,DNS:localhost,IP:127.0.0.1,DNS:fedmq-rabbitmq,DNS:fedmq-rabbitmq.fedmq.svc,DNS:fedmq-rabbitmq.fedmq.svc.cluster.local"
sans="$sans,DNS:*.fedmq-rabbitmq-nodes.fedmq.svc.cluster.local"
for extra in "$@"; do sans="$sans,$extra"; done

openssl req -x509 -newkey rsa:3072 -nodes -days "$days" -subj "/CN=fedmq dev CA" \
    -keyout ca.key -out ca.pem \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"

issue() { # name, subject CN, extensions
    openssl req -newkey rsa:3072 -nodes -subj "/CN=$2" -keyout "$1.key" -out "$1.csr"
    printf '%s\n' "$3" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial \
        -days "$days" -out "$1.pem" -extfile "$1.ext"
    rm -f "$1.csr" "$1.ext"
}
issue server rabbitmq "subjectAltName=$sans
extendedKeyUsage=serverAuth
keyUsage=critical,digitalSignature,keyEncipherment"
issue client fedmq-client "extendedKeyUsage=clientAuth
keyUsage=critical,digitalSignature,keyEncipherment"

chmod 0644 server.key client.key
chmod 0600 ca.key
openssl verify -CAfile ca.pem server.pem client.pem
echo "TLS material in $(pwd): ca.pem server.pem server.key client.pem client.key"
