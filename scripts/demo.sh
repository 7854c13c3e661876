#!/usr/bin/env bash
# spore's main job, end to end, on its embedded defaults:
#   install what is needed, build, build the demo guest, start an agent,
#   import the guest's disk as an image, boot a VM from it over NBD, make a
#   second layer from inside a VM, boot a VM from base + layer, capture a
#   running VM as a template and start a burst of clones from it, kill -9
#   the agent and show its VMs running on under the next one, then a
#   small storm of hosts booting from cold, a live migration between two
#   of them, a clone captured there and migrated back, a remote operator,
#   and a check of a host's store (fsck).
# Everything lives under .cache/demo (SPORE_DEMO_DIR to change); the agent
# and its VMs are stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
say() { printf '\n\033[1m== %s\033[0m\n' "$*" >&2; }

say "installing system packages (QEMU, NBD tools, guest build tools)"
bash scripts/install-deps.sh
say "building spore (release)"
cargo build --release --locked -p spore
SPORE=$ROOT/target/release/spore
say "building the demo guest (Debian cloud kernel + busybox, 512 MiB ext4 root)"
bash guest/build.sh
G=$ROOT/.cache/guest

DEMO=${SPORE_DEMO_DIR:-$ROOT/.cache/demo}
rm -rf "$DEMO"
mkdir -p "$DEMO"
export SPORE_HOME=$DEMO/data
say "starting an agent on $SPORE_HOME"
"$SPORE" agent --clone-standby 2 >"$DEMO/agent.log" 2>&1 &
AGENT=$!
export SPORE_CLUSTER_DIR=$DEMO/clusters
cleanup() {
    # The agent's VMs outlive a SIGTERM (restarts keep them): stop both.
    "$SPORE" agent stop --vms >/dev/null 2>&1 || kill -TERM "$AGENT" 2>/dev/null
    wait "$AGENT" 2>/dev/null || true
    "$SPORE" cluster down --name demo >/dev/null 2>&1 || true
}
trap cleanup EXIT
for _ in $(seq 1 100); do "$SPORE" status >/dev/null 2>&1 && break; sleep 0.1; done
"$SPORE" status

say "importing the guest disk as image 'base'"
"$SPORE" image import "$G/rootfs.img" --name base
"$SPORE" image inspect base

# The uncompressed kernel boots directly (PVH) and the crypto self-tests are
# skipped: about a quarter less of a TCG boot (docs/guest.md).
KERNEL=$G/vmlinux
[ -f "$KERNEL" ] || KERNEL=$G/vmlinuz
APPEND="console=ttyS0 root=/dev/vda quiet cryptomgr.notests"
boot() { # name image extra-append
    local t0 t1
    t0=$(date +%s%N)
    "$SPORE" vm run "$1" --image "$2" --kernel "$KERNEL" --initrd "$G/initrd.img" \
        --append "$APPEND $3" --wait-for SPORE-READY --timeout 180 >"$DEMO/$1.console"
    t1=$(date +%s%N)
    grep -E '^SPORE-' "$DEMO/$1.console" | sed "s/^/  [$1] /"
    local ms=$(( (t1 - t0) / 1000000 ))
    printf '  [%s] ready %d.%03d s after `spore vm run`\n' "$1" $((ms / 1000)) $((ms % 1000))
}

say "booting VM 'vm1' from image 'base' over NBD"
boot vm1 base ""

say "making a layer from inside a VM: it writes /etc/motd and powers off"
boot builder base "spore.write=/etc/motd=hello-from-a-spore-layer spore.poweroff"
for _ in $(seq 1 100); do
    "$SPORE" vm ls | grep -E '^builder +stopped' >/dev/null && break
    sleep 0.2
done
"$SPORE" disk commit builder --name app

say "booting VM 'vm2' from image 'app' (base + the committed layer)"
boot vm2 app "spore.cat=/etc/motd"

say "what is there"
"$SPORE" image ls
"$SPORE" image inspect app | sed -n '1,12p'
"$SPORE" disk ls
"$SPORE" vm ls
echo "The guests read only a part of the 512 MiB image (READ column above)." >&2

say "a template: boot 'web' (a counter runs in it), capture it in memory"
boot web base "spore.counter"
sleep 2
"$SPORE" vm template web --name web-t
sleep 1  # the agent starts 2 standby clones (--clone-standby 2): the first 2 of a burst skip QEMU's start
say "a burst of 8 clones: resumed from the template, not booted (compare with the boot times above)"
"$SPORE" vm clone web-t --count 8 --name api
sleep 2
for v in api-1 api-2 api-3; do
    "$SPORE" vm log "$v" | grep -a -o -E 'SPORE-(IDENTITY|COUNTER).*' | sed -n "1,2s/^/  [$v] /p"
done
echo "Each clone kept counting from where 'web' was, with its own hostname, MAC, instance id and RNG." >&2
say "a clone bigger than its template (memory and CPUs hot-plugged, seen from inside)"
"$SPORE" vm clone web-t --name big --memory 768M --cpus 2
for _ in $(seq 1 50); do "$SPORE" vm log big-1 | grep -q SPORE-RESOURCES && break; sleep 0.2; done
"$SPORE" vm log big-1 | grep -a -o 'SPORE-RESOURCES.*' | sed 's/^/  [big-1] /'
"$SPORE" vm ls
say "the agent is killed (kill -9) and started again: its VMs go on in the same QEMU processes"
pids() { "$SPORE" vm ls --json | python3 -c 'import json, sys; print(" ".join(v["name"] + ":" + str(v["pid"]) for v in json.load(sys.stdin) if v["state"] == "running"))'; }
counter() { "$SPORE" vm log api-1 | grep -a -o 'SPORE-COUNTER n=[0-9]*' | tail -n 1; }
before=$(pids); count_before=$(counter)
kill -KILL "$AGENT"
wait "$AGENT" 2>/dev/null || true
"$SPORE" agent --clone-standby 2 >>"$DEMO/agent.log" 2>&1 &
AGENT=$!
for _ in $(seq 1 100); do "$SPORE" status >/dev/null 2>&1 && break; sleep 0.1; done
"$SPORE" status
sleep 2
after=$(pids)
echo "  VMs (name:QEMU pid) before: $before" >&2
echo "  VMs (name:QEMU pid) after:  $after" >&2
echo "  api-1's counter: $count_before before the kill, $(counter) now" >&2
[ "$before" = "$after" ] || { echo "a VM did not survive the agent's restart" >&2; exit 1; }
"$SPORE" vm rm --group api
"$SPORE" vm rm --group big
# The template's RAM lives in tmpfs until the template is removed.
"$SPORE" vm rm --force web
"$SPORE" template rm web-t

NODES=${SPORE_DEMO_NODES:-4}
say "a small storm: an origin and $NODES hosts (network namespaces, 100 Mbit/s links), all booting from cold at once"
"$SPORE" cluster up --name demo --nodes "$NODES" --fanout 2 --bandwidth 100mbit
C=$SPORE_CLUSTER_DIR/demo
SPORE_HOME=$C/origin "$SPORE" image import "$G/rootfs.img" --name base >/dev/null
echo "origin holds image 'base'; hosts 1..$NODES have nothing" >&2
T0=$(date +%s%N)
storm=()
for n in $(seq 1 "$NODES"); do
    (
        SPORE_HOME=$C/node$n "$SPORE" vm run "storm$n" --image base --kernel "$KERNEL" --initrd "$G/initrd.img" \
            --append "$APPEND" --wait-for SPORE-READY --timeout 300 >"$DEMO/storm$n.console" 2>&1
        t=$(( ($(date +%s%N) - T0) / 1000000 ))
        printf '  node%s ready after %d.%03d s: %s\n' "$n" $((t / 1000)) $((t % 1000)) "$(grep -m1 -o 'SPORE-READY.*' "$DEMO/storm$n.console" || echo 'no marker')"
    ) &
    storm+=($!)
done
# Only the storm's jobs: a bare `wait` would also wait for the agent.
for pid in "${storm[@]}"; do wait "$pid" || true; done
say "where the bytes came from"
for h in origin $(seq -f 'node%g' 1 "$NODES"); do
    echo "  [$h]"
    SPORE_HOME=$C/$h "$SPORE" status | grep -E 'source|served' | sed 's/^ */    /'
done
echo >&2
echo "Each host fetched only the boot's working set, from its parent in the tree (docs/distribution.md)." >&2

say "an authenticated fleet: hosts talk mutual TLS with certificates of the cluster's CA (spore ca); strangers get nothing"
read -r OIP N1NS < <(python3 -c 'import json, sys; s = json.load(open(sys.argv[1])); print(s["origin"]["ip"], s["nodes"][0]["netns"])' "$C/cluster.json")
probe() { # curl arguments -> the HTTP status the origin answered node1's namespace with
    ip netns exec "$N1NS" curl -s -o /dev/null -w '%{http_code}' --max-time 10 "$@" || true
}
P=$C/node1/pki
echo "  node1 with its certificate (role host):      HTTP $(probe --cacert "$P/ca.pem" --cert "$P/cert.pem" --key "$P/key.pem" "https://$OIP:7070/v1/images/base")" >&2
echo "  the same namespace without a certificate:    HTTP $(probe --cacert "$P/ca.pem" "https://$OIP:7070/v1/images/base") (000: refused at the TLS handshake)" >&2
echo "  plaintext to the same port:                  HTTP $(probe "http://$OIP:7070/v1/images/base")" >&2
echo "Every fetch, push and migration request above went over such connections; the migration below carries QEMU's memory stream in the same TLS, a relay at each end (docs/security.md)." >&2

say "live migration: storm1 moves from node1 to node2 while it runs (policy auto)"
# guest_line HOST MARKER: the last console line of storm1 on HOST with MARKER
# (waited for up to 30 s), without the marker.
guest_line() {
    local line=
    for _ in $(seq 1 150); do
        line=$(SPORE_HOME=$C/$1 "$SPORE" vm log storm1 | grep -a -o "$2 mem=.*" | tail -1 || true)
        [ -n "$line" ] && break
        sleep 0.2
    done
    echo "${line#"$2 "}"
}
echo "  storm1 writes 4 MiB of random data to its memory and its disk" >&2
SPORE_HOME=$C/node1 "$SPORE" vm send storm1 dataset write 4 >/dev/null
written=$(guest_line node1 SPORE-DATASET)
SPORE_HOME=$C/node1 "$SPORE" vm migrate storm1 --to node2 --cluster demo --bandwidth 90mbit
SPORE_HOME=$C/node2 "$SPORE" vm send storm1 dataset check >/dev/null
checked=$(guest_line node2 SPORE-DATASET-CHECK)
echo "  data set written on node1: $written" >&2
echo "  checked on node2:          $checked" >&2
[ -n "$written" ] && [ "$written" = "$checked" ] && echo "  intact after the move" >&2 || echo "  MISMATCH" >&2
SPORE_HOME=$C/node2 "$SPORE" vm ls
stream=$(SPORE_HOME=$C/node1 "$SPORE" vm migration storm1 --json | python3 -c 'import json, sys; print("spore TLS relay, certificates verified both ways" if json.load(sys.stdin).get("stream_tls") else "PLAINTEXT")')
echo "  memory stream: $stream" >&2

say "every VM migrates: storm1 captured on node2 as a template, a clone of it moved to node1 (its identity goes with it)"
SPORE_HOME=$C/node2 "$SPORE" vm template storm1 --name storm-t >/dev/null
SPORE_HOME=$C/node2 "$SPORE" vm clone storm-t --name moved >/dev/null
SPORE_HOME=$C/node2 "$SPORE" vm migrate moved-1 --to node1 --cluster demo
SPORE_HOME=$C/node1 "$SPORE" vm ls

say "a remote operator: an operator certificate drives node2's agent through its peer listener (spore --remote); a host certificate cannot"
N2IP=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["nodes"][1]["ip"])' "$C/cluster.json")
"$SPORE" ca issue demo-operator --role operator --dir "$C/ca" --out "$C/operator/pki" >/dev/null
echo "  the operator, from node1's namespace: spore --remote https://$N2IP:7070 vm ls" >&2
ip netns exec "$N1NS" env SPORE_HOME="$C/operator" "$SPORE" --remote "https://$N2IP:7070" vm ls
echo "  node1's own certificate (role host) asking the same:" >&2
ip netns exec "$N1NS" env SPORE_HOME="$C/node1" "$SPORE" --remote "https://$N2IP:7070" vm ls 2>&1 | sed 's/^/    /' >&2 || true
say "checking a host's store: spore fsck on node2 (every chunk hashed, every reference followed; --repair refetches)"
SPORE_HOME=$C/node2 "$SPORE" fsck | sed 's/^/  /' || echo "  (fsck found problems: above)" >&2
echo "Stopping: VMs, agents and the cluster's namespaces are removed; data stays in $DEMO." >&2
