#!/bin/sh
# keepalived's notify hook for conntrackd: /etc/keepalived/conntrackd-notify.sh
# (root-owned, mode 0755). keepalived runs it with `primary`, `backup` or
# `fault` when the sync group changes state; it is the equivalent of
# conntrackd's primary-backup.sh, without the parts that hurt a load
# balancer:
#
# - primary: commit the connections the old master synced (the external
#   cache) into the kernel table, then start afresh as the one that owns
#   them: flush both caches, reload the internal cache from the kernel and
#   send it all to the peer.
# - backup, fault: forget what this host had synced (flush both caches) and
#   ask the master for its connections, so that the external cache holds
#   what a takeover must commit.
#
# Not here, unlike primary-backup.sh: `conntrackd -t`, which flushes the
# whole kernel table PurgeTimeout seconds later, including the connections
# of a host that became master in between (keepalived starts every host as
# BACKUP). Nor `conntrackd -F`: its deletions reach the peer's external
# cache, which may then have nothing left to commit. The connections a
# former master still tracks time out by themselves; no traffic reaches
# them while the other host holds the addresses.
#
# keepalived adds the virtual addresses before this hook runs and does not
# wait for it: a packet of an established connection that arrives before
# the commit finishes finds no connection; Lobby drops it (only
# connection-opening packets are balanced) and the client retransmits it.
set -u

CONNTRACKD_CONFIG=/etc/conntrackd/conntrackd.conf

ctd() {
    conntrackd -C "$CONNTRACKD_CONFIG" "$@" ||
        logger -t conntrackd-notify "conntrackd $* failed (state $STATE)" || true
}

STATE=${1:-}
case "$STATE" in
primary)
    ctd -c
    ctd -f
    ctd -R
    ctd -B
    ;;
backup | fault)
    ctd -f
    ctd -n
    ;;
*)
    echo "usage: $0 primary|backup|fault" >&2
    exit 1
    ;;
esac
