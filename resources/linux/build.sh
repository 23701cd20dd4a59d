#!/usr/bin/env bash
# Build the ftvmm tiny Linux guest: an uncompressed ELF vmlinux (Debian's
# linux-source-6.1, tinyconfig + ftvmm.config + patches/) and a plain newc
# initramfs (static busybox + ./init).
#
# Idempotent and incremental:
#   - packages are installed only when missing;
#   - the source tree is unpacked once (again only if the Debian source
#     package version changes); patches are applied once, and if the patch
#     set changes the old set is reversed and the new one applied, so the
#     kernel rebuild stays incremental;
#   - the kernel is configured/built only when the fragment or the patches
#     change (stamp files under out/ hold the hash of the inputs);
#   - the initramfs is rebuilt only when init or busybox change.
# A re-run with unchanged inputs and outputs present does nothing (< 1 s).
#
# Environment: JOBS (default 2), FTLINUX_OUT (default resources/linux/out),
# FTLINUX_FORCE=1 to ignore the stamps (make still runs incrementally).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${FTLINUX_OUT:-$HERE/out}
SRC=$OUT/linux-src
FRAGMENT=$HERE/ftvmm.config
PATCH_DIR=$HERE/patches
INIT=$HERE/init
CMDLINE_FILE=$HERE/cmdline
JOBS=${JOBS:-2}
FORCE=${FTLINUX_FORCE:-0}
KSRC_PKG=linux-source-6.1
KSRC_TAR=/usr/src/linux-source-6.1.tar.xz
BUSYBOX=/bin/busybox
ARCH=x86_64
export ARCH
# Stable `uname -v` / `uname -a` output independent of the build machine.
export KBUILD_BUILD_USER=ftvmm KBUILD_BUILD_HOST=ftvmm

# Applets linked in the initramfs: what init uses, plus a few for debugging.
# Keep the list short: every cpio entry is unpacked by emulated kernel code.
APPLETS="sh mount uname reboot mkfifo cat echo ls sleep usleep dmesg poweroff ifconfig taskset"
# Bump when the initramfs layout (not init's content) changes.
INITRAMFS_LAYOUT=2

log() { printf 'ftlinux-build: %s\n' "$*" >&2; }
die() { printf 'ftlinux-build: error: %s\n' "$*" >&2; exit 1; }

sha() { sha256sum | cut -d' ' -f1; }

mkdir -p "$OUT"

# ---------------------------------------------------------------- packages
PACKAGES="linux-source-6.1 busybox-static build-essential flex bison bc libelf-dev cpio xz-utils"
missing=()
for p in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if ((${#missing[@]})); then
    log "installing missing packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
[[ -f $KSRC_TAR ]] || die "$KSRC_TAR not found (is $KSRC_PKG installed?)"

ksrc_version=$(dpkg-query -W -f='${Version}' "$KSRC_PKG")

# ---------------------------------------------------------------- patches
shopt -s nullglob
patches=("$PATCH_DIR"/*.patch)
shopt -u nullglob
patches_hash=$(for p in "${patches[@]}"; do basename "$p"; cat "$p"; done | sha)

# ---------------------------------------------------------------- source
if [[ ! -f $SRC/.ftvmm-source-version || $(cat "$SRC/.ftvmm-source-version") != "$ksrc_version" ]]; then
    log "unpacking $KSRC_TAR ($ksrc_version) into $SRC"
    rm -rf "$SRC" "$SRC.tmp"
    mkdir -p "$SRC.tmp"
    tar -xJf "$KSRC_TAR" -C "$SRC.tmp" --strip-components=1
    echo "$ksrc_version" >"$SRC.tmp/.ftvmm-source-version"
    mv "$SRC.tmp" "$SRC"
fi

applied_dir=$SRC/.ftvmm-applied
if [[ ! -f $applied_dir/series-hash || $(cat "$applied_dir/series-hash") != "$patches_hash" ]]; then
    if [[ -d $applied_dir ]]; then
        # Reverse the previously applied set (newest first), from the copies
        # recorded when they were applied.
        mapfile -t old < <(ls "$applied_dir"/*.patch 2>/dev/null | sort -r)
        for p in "${old[@]}"; do
            log "reversing $(basename "$p")"
            patch -d "$SRC" -p1 -R -s --no-backup-if-mismatch <"$p" \
                || die "could not reverse $(basename "$p"); delete $SRC and re-run"
        done
    fi
    rm -rf "$applied_dir"
    mkdir -p "$applied_dir"
    for p in "${patches[@]}"; do
        log "applying $(basename "$p")"
        patch -d "$SRC" -p1 -s --forward --dry-run --no-backup-if-mismatch <"$p" >/dev/null \
            || die "$(basename "$p") does not apply to $KSRC_PKG $ksrc_version"
        patch -d "$SRC" -p1 -s --forward --no-backup-if-mismatch <"$p"
        cp "$p" "$applied_dir/"
    done
    echo "$patches_hash" >"$applied_dir/series-hash"
fi

# ---------------------------------------------------------------- configure
kernel_key=$({ echo "$ksrc_version"; echo "$patches_hash"; cat "$FRAGMENT"; } | sha)

verify_config() {
    local bad=0 line sym
    while IFS= read -r line; do
        if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
            if ! grep -qxF -- "$line" "$SRC/.config"; then
                sym=${BASH_REMATCH[1]}
                echo "  wanted: $line   got: $(grep -E "^(# )?$sym[= ]" "$SRC/.config" || echo '(absent)')" >&2
                bad=1
            fi
        elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
            sym=${BASH_REMATCH[1]}
            if grep -qE "^$sym=" "$SRC/.config"; then
                echo "  wanted: $line   got: $(grep -E "^$sym=" "$SRC/.config")" >&2
                bad=1
            fi
        fi
    done <"$FRAGMENT"
    ((bad == 0)) || die "options of $(basename "$FRAGMENT") did not survive olddefconfig (above)"
}

if [[ $FORCE == 1 || ! -f $SRC/.config || ! -f $OUT/.config-stamp || $(cat "$OUT/.config-stamp") != "$kernel_key" ]]; then
    log "configuring: tinyconfig + $(basename "$FRAGMENT")"
    rm -f "$OUT/.config-stamp" "$OUT/.vmlinux-stamp"
    make -C "$SRC" -s tinyconfig >/dev/null
    (cd "$SRC" && scripts/kconfig/merge_config.sh -m -O . .config "$FRAGMENT" >"$OUT/merge_config.log" 2>&1) \
        || { cat "$OUT/merge_config.log" >&2; die "merge_config.sh failed"; }
    make -C "$SRC" -s olddefconfig >/dev/null
    verify_config
    echo "$kernel_key" >"$OUT/.config-stamp"
else
    verify_config
fi

# ---------------------------------------------------------------- vmlinux
if [[ $FORCE == 1 || ! -f $OUT/vmlinux || ! -f $OUT/.vmlinux-stamp || $(cat "$OUT/.vmlinux-stamp") != "$kernel_key" ]]; then
    log "building vmlinux (make -j$JOBS; ~5 min from scratch on 2 cores)"
    start=$SECONDS
    nice -n 10 make -C "$SRC" -j"$JOBS" vmlinux
    cp "$SRC/vmlinux" "$OUT/vmlinux.tmp"
    mv "$OUT/vmlinux.tmp" "$OUT/vmlinux"
    cp "$SRC/.config" "$OUT/config"
    echo "$kernel_key" >"$OUT/.vmlinux-stamp"
    log "vmlinux built in $((SECONDS - start)) s"
fi

# ---------------------------------------------------------------- initramfs
[[ -x $BUSYBOX ]] || die "$BUSYBOX missing (busybox-static)"
if readelf -l "$BUSYBOX" | grep -q 'Requesting program interpreter'; then
    die "$BUSYBOX is dynamically linked; install busybox-static"
fi
initramfs_key=$({ echo "$INITRAMFS_LAYOUT $APPLETS"; cat "$INIT"; sha256sum <"$BUSYBOX"; } | sha)

if [[ $FORCE == 1 || ! -f $OUT/initramfs.cpio || ! -f $OUT/.initramfs-stamp || $(cat "$OUT/.initramfs-stamp") != "$initramfs_key" ]]; then
    log "building initramfs.cpio"
    root=$OUT/initramfs-root
    rm -rf "$root"
    mkdir -p "$root"/{bin,dev,etc,proc,run,sys,tmp,root}
    install -m 0755 "$BUSYBOX" "$root/bin/busybox"
    for a in $APPLETS; do ln -s busybox "$root/bin/$a"; done
    install -m 0755 "$INIT" "$root/init"
    # The kernel opens /dev/console for init before anything is mounted, so
    # the node must be in the archive (devtmpfs is mounted over /dev later).
    mknod -m 0600 "$root/dev/console" c 5 1
    mknod -m 0666 "$root/dev/null" c 1 3
    chmod 1777 "$root/tmp"
    # init mounts these with a single `mount -a` (one process instead of 3).
    printf '%s\n' \
        'proc     /proc proc     defaults 0 0' \
        'sysfs    /sys  sysfs    defaults 0 0' \
        'devtmpfs /dev  devtmpfs defaults 0 0' >"$root/etc/fstab"
    # init's count mode sleeps with `read -t` on this FIFO (no fork per line).
    mkfifo -m 0600 "$root/run/tick"
    # Reproducible archive: fixed mtimes, root ownership, sorted entries.
    find "$root" -exec touch -h -d @0 {} +
    (cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
        cpio -o -H newc -R 0:0 --reproducible --quiet >"$OUT/initramfs.cpio.tmp")
    mv "$OUT/initramfs.cpio.tmp" "$OUT/initramfs.cpio"
    echo "$initramfs_key" >"$OUT/.initramfs-stamp"
fi

# ---------------------------------------------------------------- report
[[ -f $CMDLINE_FILE && $(wc -l <"$CMDLINE_FILE") -le 1 ]] || die "$CMDLINE_FILE must hold one line"
cmdline=$(head -n1 "$CMDLINE_FILE")
cat <<EOF
kernel:    $OUT/vmlinux
initramfs: $OUT/initramfs.cpio
cmdline:   $cmdline   (from $CMDLINE_FILE)
run:       ftvmm run --kernel $OUT/vmlinux --initrd $OUT/initramfs.cpio --cmdline "\$(cat $CMDLINE_FILE)" --mem-mib 128 --serial stdout
EOF
