"""Filesystem snapshots around a pull: shell text that runs on the client. Pure builders only.

A client with ``snapshot = "btrfs"`` or ``"lvm"`` gets the run script of remote.py with a prelude
(``SNAPSHOT_PRELUDE``) in front. The prelude defines ``snapshot_prepare``, which the run script
calls after its socket checks and after stopping an earlier run's borg, before it says
``borgtunnel-ready``:

1. it refuses a non-root login user (snapshots and mounts need root) and missing tools;
2. it sweeps what a killed run left: snapshots named ``.borgtunnel-snap-CLIENT-PID`` (Btrfs,
   next to the subvolume they copy) or ``borgtunnel-snap-CLIENT-PID`` (LVM, in any volume group)
   whose PID is no longer a borgtunnel run, and their staging directories;
3. it takes one read-only snapshot per subvolume / logical volume holding a configured path.

borg then runs under ``unshare --mount --propagation private``: inside that private mount
namespace, each snapshot is mounted on a staging directory next to the socket and the matching
part of it is bind-mounted over the original path, so the archive holds the original paths and
nothing outside that one process tree sees any mount. The namespace, and every mount in it,
ends with borg. An EXIT trap (also on HUP, INT, TERM) stops borg if it still runs and removes the
snapshots and the staging directory: a lost link, a cancel or borg's crash all end there. A run
killed with SIGKILL leaves them for the next run's sweep.

A snapshot that cannot be taken fails the run before borg starts (exit ``SNAPSHOT_FAILED``),
unless ``snapshot_fallback`` is on: then that path is read live, borg's first stderr line says so
and a run that borg finished with status 0 exits 1 (a warning).

The arguments travel like every other value (``set --``, base64): KIND CLIENT LVM_SIZE FALLBACK
N PATH1..PATHN, then the run script's own arguments. The request kind differs from a plain run
(``REQUEST_RUN_SNAPSHOT``) so a client-side gatekeeper, which builds its own commands, refuses it
by name instead of silently running without the snapshot.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from borgtunnel.client.remote import RUN_SCRIPT, encoded_command

REQUEST_RUN_SNAPSHOT = "borgtunnel-run-snapshot"

# Exit codes of the prepare step, away from remote.RunExit's range so the two can grow apart.
SNAPSHOT_NOT_ROOT = 90
SNAPSHOT_NO_TOOL = 91
SNAPSHOT_FAILED = 92

SNAPSHOT_PREFIX = ".borgtunnel-snap-"  # Btrfs snapshots: SUBVOLUME/.borgtunnel-snap-CLIENT-PID
LVM_SNAPSHOT_PREFIX = "borgtunnel-snap-"  # LVM: VG/borgtunnel-snap-CLIENT-PID

# Runs as `unshare … sh -c INNER borgtunnel-snapshot BORG…` in the private mount namespace.
# BORGTUNNEL_SNAP_N ops, each OP (bind | dev | devxfs) SRC DST; binds after devs, SRC relative to
# the staging directory (mount -c: taken as given, resolved from the cwd, so a bind over a path
# that holds the staging directory cannot redirect a later one). No single quote in here.
_INNER = r"""
set -u
i=1
[ "${BORGTUNNEL_SNAP_N:-0}" = 0 ] || cd "$BORGTUNNEL_SNAP_STAGE" || exit 2
while [ "$i" -le "${BORGTUNNEL_SNAP_N:-0}" ]; do
  eval "op=\$BORGTUNNEL_SNAP_${i}_OP src=\$BORGTUNNEL_SNAP_${i}_SRC dst=\$BORGTUNNEL_SNAP_${i}_DST"
  case $op in
    dev) mount -o ro -- "$src" "$dst" ;;
    devxfs) mount -o ro,nouuid -- "$src" "$dst" ;;
    bind) mount -c --bind -- "$src" "$dst" ;;
    *) false ;;
  esac || { echo "borgtunnel: cannot mount the snapshot $src on $dst" >&2; exit 2; }
  unset "BORGTUNNEL_SNAP_${i}_OP" "BORGTUNNEL_SNAP_${i}_SRC" "BORGTUNNEL_SNAP_${i}_DST"
  i=$((i + 1))
done
cd /
[ -z "${BORGTUNNEL_SNAP_WARN:-}" ] || printf %s "$BORGTUNNEL_SNAP_WARN" >&2
unset BORGTUNNEL_SNAP_N BORGTUNNEL_SNAP_WARN BORGTUNNEL_SNAP_STAGE
exec "$@"
"""

SNAPSHOT_PRELUDE = (
    r"""
snap_kind=$1; snap_client=$2; snap_size=$3; snap_fallback=$4; snap_n=$5; shift 5
snap_nl='
'
snap_paths=
while [ "$snap_n" -gt 0 ]; do snap_paths=$snap_paths$1$snap_nl; shift; snap_n=$((snap_n - 1)); done
snap_made=
snap_stage=
snap_k=0
snap_ops=0
snap_binds=
snap_warn=
snap_fellback=
snap_inner='"""
    + _INNER
    + r"""'
borgtunnel_snap=1
# borg runs in a private mount namespace where the snapshots cover the original paths.
snap_a=$1; snap_b=$2; snap_c=$3; shift 3
set -- "$snap_a" "$snap_b" "$snap_c" unshare --mount --propagation private \
  sh -c "$snap_inner" borgtunnel-snapshot "$@"

snap_live() {  # is pid $1 a borgtunnel run still (a reused pid is not)?
  kill -0 "$1" 2>/dev/null || return 1
  [ ! -r "/proc/$1/cmdline" ] || tr '\0' ' ' < "/proc/$1/cmdline" | grep -q borgtunnel
}
snap_pid_of() {  # $1 NAME, $2 PREFIX -> $snap_pid, or false if NAME is not PREFIX + digits
  snap_pid=${1#"$2"}
  [ "$snap_pid" != "$1" ] && [ -n "$snap_pid" ] || return 1
  case $snap_pid in *[!0-9]*) return 1 ;; esac
}
snap_add_op() {  # OP SRC DST
  snap_ops=$((snap_ops + 1))
  eval "BORGTUNNEL_SNAP_${snap_ops}_OP=\$1 BORGTUNNEL_SNAP_${snap_ops}_SRC=\$2"
  eval "BORGTUNNEL_SNAP_${snap_ops}_DST=\$3"
  export "BORGTUNNEL_SNAP_${snap_ops}_OP" "BORGTUNNEL_SNAP_${snap_ops}_SRC"
  export "BORGTUNNEL_SNAP_${snap_ops}_DST"
}
snap_fail() {  # $1 the reason: fatal, or a warning with snapshot_fallback
  if [ "$snap_fallback" = 1 ]; then
    snap_fellback=1
    snap_warn="${snap_warn}borgtunnel: warning: $1; backing up the live files"
    snap_warn="$snap_warn (snapshot_fallback)$snap_nl"
    return 0
  fi
  echo "borgtunnel: $1 (set snapshot_fallback = true to back up the live files instead)" >&2
  return 92
}
# The Btrfs subvolume holding $1 (a real path) -> $snap_sub; its root directory has inode 256.
snap_subvolume() {
  snap_sub=$1
  [ -d "$snap_sub" ] || snap_sub=${snap_sub%/*}
  [ -n "$snap_sub" ] || snap_sub=/
  snap_dev=$(stat -c %d -- "$snap_sub") || return 1
  while [ "$(stat -c %i -- "$snap_sub")" != 256 ]; do
    [ "$snap_sub" != / ] || return 1
    snap_sub=${snap_sub%/*}; [ -n "$snap_sub" ] || snap_sub=/
    [ "$(stat -c %d -- "$snap_sub")" = "$snap_dev" ] || return 1
  done
}
snap_sweep() {
  set +f
  if [ "$snap_kind" = btrfs ]; then
    printf %s "$snap_paths" | while IFS= read -r q; do
      r=$(readlink -f -- "$q") && [ "$(stat -f -c %T -- "$r" 2>/dev/null)" = btrfs ] || continue
      snap_subvolume "$r" || continue
      for x in "${snap_sub%/}/.borgtunnel-snap-$snap_client-"*; do
        snap_pid_of "${x##*/}" ".borgtunnel-snap-$snap_client-" || continue
        snap_live "$snap_pid" && continue
        echo "borgtunnel: removed snapshot $x, left by an earlier run"
        btrfs subvolume delete -- "$x" >/dev/null 2>&1 ||
          echo "borgtunnel: could not remove the stale snapshot $x"
      done
    done
  else
    lvs --noheadings -o vg_name,lv_name 2>/dev/null | while read -r vg lv; do
      snap_pid_of "$lv" "borgtunnel-snap-$snap_client-" || continue
      snap_live "$snap_pid" && continue
      echo "borgtunnel: removed snapshot $vg/$lv, left by an earlier run"
      lvremove -q -f -- "$vg/$lv" >/dev/null 2>&1 ||
        echo "borgtunnel: could not remove the stale snapshot $vg/$lv"
    done
  fi
  for x in "$d/borgtunnel-snap-$snap_client-"*; do
    snap_pid_of "${x##*/}" "borgtunnel-snap-$snap_client-" || continue
    snap_live "$snap_pid" || rmdir -- "$x"/* "$x" 2>/dev/null
  done
  set -f
}
# One staging directory per snapshot: $snap_stage/K (made here, removed by snap_cleanup).
snap_new_stage() {
  snap_k=$((snap_k + 1))
  mkdir -p -m 0700 -- "$snap_stage/$snap_k" || return 1
}
snap_take_btrfs() {  # $1 a configured path
  r=$(readlink -f -- "$1") && [ -e "$r" ] || return 0  # missing: borg itself warns
  fs=$(stat -f -c %T -- "$r") || fs=unknown
  [ "$fs" = btrfs ] || { snap_fail "cannot snapshot $1: it is on $fs, not btrfs"; return; }
  snap_subvolume "$r" ||
    { snap_fail "cannot snapshot $1: no btrfs subvolume root above it (a bind mount?)"; return; }
  # A subvolume nested below the path would be an empty directory in the snapshot.
  srel=$(btrfs subvolume show -- "$snap_sub" | head -n 1) ||
    { snap_fail "cannot snapshot $1: btrfs subvolume show $snap_sub failed"; return; }
  nested=$(btrfs subvolume list -o -- "$snap_sub" | while IFS= read -r line; do
    n=${line#* path }
    [ "$srel" = / ] || n=${n#"$srel"/}
    n=${snap_sub%/}/$n
    case ${n##*/} in .borgtunnel-snap-*) continue ;; esac
    case $n/ in "${r%/}"/*) ;; *) continue ;; esac
    case $snap_nl$snap_real in *"$snap_nl$n$snap_nl"*) continue ;; esac
    printf '%s\n' "$n"
  done)
  [ -z "$nested" ] || { snap_fail "cannot snapshot $1: it holds the btrfs subvolume $(
    printf %s "$nested" | head -n 1) (a snapshot leaves it empty); list it in paths too"
    return; }
  snap="${snap_sub%/}/.borgtunnel-snap-$snap_client-$$"
  case $snap_nl$snap_made in
    *"${snap_nl}btrfs $snap$snap_nl"*) k=$(printf %s "$snap_keys" | grep -F -x -- "$snap" -n |
      head -n 1); k=${k%%:*} ;;
    *)
      btrfs subvolume snapshot -r -- "$snap_sub" "$snap" >/dev/null ||
        { snap_fail "cannot snapshot $1: btrfs subvolume snapshot of $snap_sub failed"; return; }
      snap_made="${snap_made}btrfs $snap$snap_nl"
      snap_keys="${snap_keys}$snap$snap_nl"
      snap_new_stage || { echo "borgtunnel: cannot create $snap_stage/$snap_k" >&2; return 92; }
      k=$snap_k
      snap_add_op bind "/${snap#/}" "$snap_stage/$k" ;;
  esac
  snap_bind "$k" "$snap_sub" "$r"
}
snap_take_lvm() {  # $1 a configured path
  r=$(readlink -f -- "$1") && [ -e "$r" ] || return 0
  m=$(stat -c %m -- "$r") && dev=$(findmnt -n -r -o SOURCE -M "$m") &&
    fs=$(findmnt -n -r -o FSTYPE -M "$m") ||
    { snap_fail "cannot snapshot $1: no device found for its mount point ${m:-}"; return; }
  set -- "$1" $(lvs --noheadings -o vg_name,lv_name -- "$dev" 2>/dev/null)
  [ $# = 3 ] ||
    { snap_fail "cannot snapshot $1: $dev (mounted at $m) is not an LVM logical volume"; return; }
  vg=$2; lv=$3
  snap="borgtunnel-snap-$snap_client-$$"
  case $snap_nl$snap_made in
    *"${snap_nl}lvm $vg/$snap$snap_nl"*) k=$(printf %s "$snap_keys" | grep -F -x -- "$vg/$snap" -n |
      head -n 1); k=${k%%:*} ;;
    *)
      case $snap_size in *%*) opt=-l ;; *) opt=-L ;; esac
      lvcreate -q -q -s -n "$snap" "$opt" "$snap_size" -- "$vg/$lv" >/dev/null ||
        { snap_fail "cannot snapshot $1: lvcreate ($snap_size) of $vg/$lv failed"; return; }
      snap_made="${snap_made}lvm $vg/$snap$snap_nl"
      snap_keys="${snap_keys}$vg/$snap$snap_nl"
      snap_new_stage || { echo "borgtunnel: cannot create $snap_stage/$snap_k" >&2; return 92; }
      k=$snap_k
      op=dev; [ "$fs" = xfs ] && op=devxfs
      snap_add_op "$op" "/dev/$vg/$snap" "$snap_stage/$k" ;;
  esac
  snap_bind "$k" "$m" "$r"
}
snap_bind() {  # K ROOT PATH: STAGE/K/(PATH below ROOT) will cover PATH
  eval "snap_root_$1=\$2"
  snap_binds="$snap_binds$(printf %s "$3" | tr -cd / | wc -c) $1 $3$snap_nl"
}
# The binds after the mounts on the staging directories, outer paths first: an inner path's
# snapshot (a nested subvolume) goes on top of the outer one's.
snap_emit_binds() {
  printf %s "$snap_binds" | sort -n -s -k 1,1 > "$snap_stage/order" || return 92
  while IFS= read -r line; do
    rest=${line#* }; k=${rest%% *}; r=${rest#* }
    eval "root=\$snap_root_$k"
    snap_add_op bind "$k${r#"${root%/}"}" "$r"
  done < "$snap_stage/order"
  rm -f -- "$snap_stage/order"
}
# The EXIT trap: borg must be gone before its snapshots go; a fallback makes a clean run a warning.
snap_on_exit() {
  s=$1
  trap '' PIPE HUP INT TERM
  trap - EXIT
  if [ -n "${pid:-}" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null
    i=0
    while [ $i -lt 100 ] && kill -0 "$pid" 2>/dev/null; do sleep 0.1; i=$((i + 1)); done
  fi
  printf %s "$snap_made" | while IFS= read -r line; do
    t=${line%% *}; x=${line#* }; i=0
    # An LVM snapshot stays busy until the kernel has torn down borg's mount namespace.
    until case $t in
      btrfs) btrfs subvolume delete -- "$x" >/dev/null 2>&1 ;;
      *) lvremove -q -f -- "$x" >/dev/null 2>&1 ;;
    esac; do
      i=$((i + 1))
      [ $i -lt 20 ] || { echo "borgtunnel: could not remove the snapshot $x; the next run" \
        "removes it" >&2; break; }
      sleep 0.2
    done
  done
  if [ -n "$snap_stage" ] && [ -d "$snap_stage" ]; then
    set +f
    rm -f -- "$snap_stage/order"
    rmdir -- "$snap_stage"/* "$snap_stage" 2>/dev/null
  fi
  owner=
  [ -z "${pf:-}" ] || read -r owner _ 2>/dev/null < "$pf"
  [ "$owner" != "$$" ] || rm -f -- "$p" "$pf"
  if [ "$s" = 0 ] && [ -n "$snap_fellback" ]; then exit 1; fi
  exit "$s"
}
snapshot_prepare() {
  trap 'snap_on_exit $?' EXIT
  trap 'exit 129' HUP; trap 'exit 130' INT; trap 'exit 143' TERM; trap 'exit 141' PIPE
  if [ "$(id -u)" != 0 ]; then
    echo "borgtunnel: snapshot = \"$snap_kind\" needs root on the client; the login user is" \
      "$(id -un) (log in as root, or turn snapshot off)" >&2
    return 90
  fi
  if [ "$snap_kind" = btrfs ]; then tools="btrfs unshare findmnt"; else
    tools="lvcreate lvremove lvs unshare findmnt"; fi
  for tool in $tools; do
    PATH=$PATH:/usr/sbin:/sbin command -v "$tool" >/dev/null 2>&1 || {
      echo "borgtunnel: snapshot = \"$snap_kind\" needs $tool on the client" >&2; return 91; }
  done
  PATH=$PATH:/usr/sbin:/sbin
  # What the sweep did goes out with borg's first lines: before "ready" the server keeps
  # only a failure's lines.
  snap_warn=$(snap_sweep)
  [ -z "$snap_warn" ] || snap_warn=$snap_warn$snap_nl
  snap_stage="$d/borgtunnel-snap-$snap_client-$$"
  snap_keys=
  snap_real=
  # Real paths of all configured paths: a nested subvolume listed itself is covered.
  snap_real=$(printf %s "$snap_paths" | while IFS= read -r q; do
    readlink -f -- "$q" || :; done)$snap_nl
  mkdir -m 0700 -- "$snap_stage" || { echo "borgtunnel: cannot create $snap_stage" >&2; return 92; }
  while IFS= read -r q; do
    [ -z "$q" ] || "snap_take_$snap_kind" "$q" || return $?
  done <<EOF_SNAP_PATHS
$snap_paths
EOF_SNAP_PATHS
  snap_emit_binds || return $?
  export BORGTUNNEL_SNAP_N=$snap_ops BORGTUNNEL_SNAP_STAGE=$snap_stage
  export BORGTUNNEL_SNAP_WARN=$snap_warn
}
"""
)


@dataclass(frozen=True)
class SnapshotPlan:
    """What the client's ``snapshot`` settings ask for."""

    kind: str  # "btrfs" or "lvm"
    client: str
    paths: tuple[str, ...]
    fallback: bool = False
    lvm_size: str = "10%ORIGIN"


def snapshot_run_command(
    plan: SnapshotPlan,
    configured_path: str,
    rsh_nc: str,
    rsh_socat: str,
    argv: Sequence[str],
) -> str:
    """remote.run_command with snapshots around borg (see the module text)."""
    args = [
        plan.kind,
        plan.client,
        plan.lvm_size,
        "1" if plan.fallback else "0",
        str(len(plan.paths)),
        *plan.paths,
        configured_path,
        rsh_nc,
        rsh_socat,
        *argv,
    ]
    return encoded_command(SNAPSHOT_PRELUDE + RUN_SCRIPT, args, kind=REQUEST_RUN_SNAPSHOT)
